"""train room of kv_vla (see docs/CONTRACTS.md)."""
