pytest_plugins = ["tests.s3server", "tests.s3rver"]
