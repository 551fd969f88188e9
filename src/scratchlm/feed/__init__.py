"""The data feed: a server that serves corpus (and teacher) texts over HTTP, and the trainer's client."""
