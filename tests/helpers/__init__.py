"""Test support: certificates, a simplestreams tree builder and a fault-injecting upstream."""
