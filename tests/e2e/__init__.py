"""Failure drills and a soak on the testbed of booted machines (see RELIABILITY.md).

The appliances are installed directly (a wheelhouse built on the host, a venv per machine, a
systemd unit per appliance): `deploy.py`. A load generator runs on the VM's network (`load.py`),
the drills are `test_drills.py`, the soak is `python3 -m tests.e2e.soak`.
"""
