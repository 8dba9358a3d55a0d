"""The ingress's routes, one router per API: each parses, calls, and maps the result to a response."""
