-- Who does a piece of work that must run once across every node of the database: the reply to a
-- session's last message (`reply/<session id>`, with the reply's progress so far for the nodes
-- that relay it) or a periodic job such as ending idle sessions. A holder renews its lease while it
-- works; a lease that expires is taken over by another node.
CREATE TABLE leases (
    name TEXT PRIMARY KEY NOT NULL,
    holder TEXT NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    session_id BIGINT REFERENCES sessions(id) ON DELETE CASCADE,
    progress TEXT,
    cancel BOOLEAN NOT NULL DEFAULT FALSE
);
CREATE INDEX leases_expires_at ON leases (expires_at);

-- Which socket may write to a session: every `hello` takes a new number, in the database's order
-- whatever node the socket is on, and a frame from a socket with an older number is refused.
ALTER TABLE sessions ADD COLUMN owner_epoch BIGINT NOT NULL DEFAULT 0;
