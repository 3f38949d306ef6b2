-- The audit page filtered by actor reads that actor's entries by this index, newest first,
-- instead of walking the whole log (a million devices' freed seats write millions of rows).
CREATE INDEX audit_log_by_actor ON audit_log(actor, id);
