-- Whether the delivery `d` is due for a lease; the lease statements (lease_*.sql) put these
-- conditions where they say `/* due */`, so that both engines and every scan of the
-- PostgreSQL statement lease by the same rules.
--
-- Pending, and due by now. A delivery with an ordering key also waits while an earlier one
-- with the same key to the same destination is still pending or in flight
-- (deliveries_ordering serves the NOT EXISTS): one key goes strictly one after another,
-- and a failing head blocks its own key only.
AND d.state = 'pending'
AND d.next_attempt_at <= :now
AND (d.ordering_key IS NULL OR NOT EXISTS (
      SELECT 1 FROM deliveries AS head
      WHERE head.destination_id = d.destination_id
        AND head.ordering_key = d.ordering_key
        AND head.state IN ('pending', 'in_flight')
        AND head.id < d.id))
