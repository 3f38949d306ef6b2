-- The signature of a lease's last renewal, kept with its record (issued_at, expires_at) so
-- that the calls of the next 15 minutes answer the same authorization without signing it
-- again: the first 16 bytes of the SHA-256 of the signed input, then the Ed25519 signature.
ALTER TABLE leases ADD COLUMN renewal_sig BLOB;
