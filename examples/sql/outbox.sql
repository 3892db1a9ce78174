-- Writing hooks from plain SQL, from any language: the outbox row goes in the
-- same transaction as the business change. Run: psql -v ON_ERROR_STOP=1 -f outbox.sql
CREATE TABLE IF NOT EXISTS invoices (id text PRIMARY KEY, tenant text NOT NULL, total numeric NOT NULL, status text NOT NULL);

BEGIN;
  INSERT INTO invoices VALUES ('inv-1', 'acme', 120.00, 'open');
  INSERT INTO walhook.outbox (event, resource_id, tenant, payload)
       VALUES ('invoice.created', 'inv-1', 'acme', '{"total": 120.00, "status": "open"}');
COMMIT;

-- The same without an outbox table: a transactional logical decoding message.
-- Nothing is stored, so nothing needs cleaning up; the event id is the message's LSN.
BEGIN;
  UPDATE invoices SET status = 'paid' WHERE id = 'inv-1';
  SELECT walhook.emit('invoice.paid', 'inv-1', '{"status": "paid"}', 'acme');
COMMIT;

-- A rolled-back transaction sends nothing.
BEGIN;
  UPDATE invoices SET status = 'void' WHERE id = 'inv-1';
  INSERT INTO walhook.outbox (event, resource_id, tenant) VALUES ('invoice.voided', 'inv-1', 'acme');
ROLLBACK;
