-- Every message changes the unread count of every member's inbox row. With last_activity_at in an
-- index, each of those updates wrote new entries into every inbox index; without it (and with free
-- space on each page) they are HOT updates that touch no index. A user's inbox is sorted from their
-- own rows (primary key prefix user_id), which is small.
DROP INDEX inbox_order;
ALTER TABLE inbox SET (fillfactor = 70);
ALTER TABLE conversations SET (fillfactor = 70);
