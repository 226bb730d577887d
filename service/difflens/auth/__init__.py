"""Who may call the front: API keys of tenants (keys.py: the key file, hashed keys, reloading), the settings of
authentication, tenant limits and TLS (settings.py); `difflens keys` is commands/keys.py. No grpc here: the
interceptor that reads the call metadata and the TLS credentials are api/auth.py and api/tls.py."""
