"""A Consul STAND-IN for tests: no Consul server is reachable from these machines, so this
package serves the slice of Consul's HTTP API that Isthmus uses, with its documented semantics
(see standin.py). It is not Consul; docs/consul.md lists what it leaves out."""
