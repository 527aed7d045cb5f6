-- Whether the delivery `d` is due for a lease; the lease statements (lease_*.sql) put these
-- conditions where they say `/* due */`, so that both engines and every scan of the
-- PostgreSQL statement lease by the same rules.
--
-- Pending, and due by now. A delivery with an ordering key also waits while an earlier one
-- with the same key to the same destination is still pending or in flight (`/* first of its
-- key */`, which each engine words as its lease best reads it, deliveries_ordering serving
-- both: leases.py), and while any one of its key is in flight, earlier or not
-- (deliveries_ordering_in_flight serves the NOT EXISTS): a later one is in flight ahead of
-- it when it was replayed from the dead-letter queue, or stored by a process whose clock is
-- behind. One key goes strictly one at a time, and a failing head blocks its own key only.
AND d.state = 'pending'
AND d.next_attempt_at <= :now
AND (d.ordering_key IS NULL OR (
      /* first of its key */
      AND NOT EXISTS (
        SELECT 1 FROM deliveries AS sending
        WHERE sending.destination_id = d.destination_id
          AND sending.ordering_key = d.ordering_key
          AND sending.state = 'in_flight')))
