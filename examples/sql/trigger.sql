-- For teams that cannot touch application code: a trigger turns an existing
-- table's INSERT/UPDATE/DELETE into outbox rows, in the same transaction.
-- Run: psql -v ON_ERROR_STOP=1 -f trigger.sql
CREATE TABLE IF NOT EXISTS customers (id bigint PRIMARY KEY, tenant text NOT NULL, name text NOT NULL);

CREATE OR REPLACE FUNCTION customers_to_outbox() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
  r customers;
BEGIN
  IF TG_OP = 'DELETE' THEN r := OLD; ELSE r := NEW; END IF;
  INSERT INTO walhook.outbox (event, resource_id, tenant, payload)
  VALUES ('customer.' || CASE TG_OP WHEN 'INSERT' THEN 'created' WHEN 'UPDATE' THEN 'updated' ELSE 'deleted' END,
          r.id::text, r.tenant, to_jsonb(r));
  RETURN NULL;
END
$$;

CREATE OR REPLACE TRIGGER customers_to_outbox AFTER INSERT OR UPDATE OR DELETE ON customers
  FOR EACH ROW EXECUTE FUNCTION customers_to_outbox();

-- The application goes on as before:
INSERT INTO customers VALUES (1, 'acme', 'Ada');
UPDATE customers SET name = 'Ada Lovelace' WHERE id = 1;
DELETE FROM customers WHERE id = 1;
