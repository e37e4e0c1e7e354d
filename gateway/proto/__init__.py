"""Sans-IO protocol cores: parsers and state machines that take bytes and events and return
decisions and commands; the asyncio code that drives them lives beside their users."""
