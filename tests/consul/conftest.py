from tests.consul_standin.fixture import standin  # noqa: F401  (a fixture)
