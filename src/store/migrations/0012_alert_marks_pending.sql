-- An alert mark is written when its crossing is found, before the email goes (`sent_at` NULL
-- until the SMTP server accepts it), with the figure then: a crossing the figure leaves
-- again before the email could go (the server down for hours) is still told. `fell`: the
-- figure went below the threshold after the email (it is told again when crossed again, a
-- week or more after the email).
CREATE TABLE alert_marks_new (
    item_id   TEXT NOT NULL REFERENCES items(item_id),
    threshold TEXT NOT NULL,            -- "consumption:75", "expiry:30", ...
    basis     INTEGER NOT NULL,         -- the quota, max_exceptions or expiry crossed against
    figure    INTEGER NOT NULL,         -- the figure when found
    found_at  INTEGER NOT NULL,
    sent_at   INTEGER,
    fell      INTEGER NOT NULL DEFAULT 0,
    PRIMARY KEY (item_id, threshold)
) STRICT, WITHOUT ROWID;

INSERT INTO alert_marks_new (item_id, threshold, basis, figure, found_at, sent_at)
    SELECT item_id, threshold, basis, 0, sent_at, sent_at FROM alert_marks;
DROP TABLE alert_marks;
ALTER TABLE alert_marks_new RENAME TO alert_marks;
