"""HTTP routes: one router module per resource; all of them thin over the service."""
