//! Whose a batch is. Batch ids are each caller's own, as idempotency keys are: with API keys on,
//! the store knows caller `billing`'s batch `invoices-2026-12` as `billing/invoices-2026-12`, so
//! two callers may both use `invoices-2026-12` and never meet. Without keys the store knows a
//! batch by its id alone, as it always has.
//!
//! The `/` is unambiguous: caller names are `a-z 0-9 _ -` and a batch id never holds a `/`
//! ([`check_batch_id`](super::rules::check_batch_id)), so the first `/` of a stored id ends the
//! caller's name, and no id a caller can send names another caller's batch. Callers only ever see
//! their own id ([`BatchId::own`]): in answers, in errors, and in log lines, where the caller is a
//! field of its own (`caller`).

/// A batch as one caller names it, and as the store knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchId {
    /// How the store knows the batch: `caller/id`, or `id` without keys.
    stored: String,
    /// Where the caller's own id starts in `stored` (0: no caller).
    own_from: usize,
}

impl BatchId {
    /// Caller `caller`'s batch `id`, as the caller sent it (checked later, by the batch runs:
    /// [`own`](Self::own) is what they check). `None` or an empty name: kabar checks no keys.
    pub fn of(caller: Option<&str>, id: &str) -> BatchId {
        match caller {
            Some(caller) if !caller.is_empty() => BatchId {
                stored: format!("{caller}/{id}"),
                own_from: caller.len() + 1,
            },
            _ => BatchId {
                stored: id.to_owned(),
                own_from: 0,
            },
        }
    }

    /// A batch as the store knows it (the list of batches with work, a message's record).
    pub fn from_stored(stored: &str) -> BatchId {
        BatchId {
            stored: stored.to_owned(),
            own_from: stored.find('/').map_or(0, |at| at + 1),
        }
    }

    /// The id the store knows the batch by.
    pub fn stored(&self) -> &str {
        &self.stored
    }

    /// The caller's own id: what the caller sent, and all it is ever shown.
    pub fn own(&self) -> &str {
        &self.stored[self.own_from..]
    }

    /// The caller the batch belongs to; `None` without keys.
    pub fn owner(&self) -> Option<&str> {
        self.own_from
            .checked_sub(1)
            .map(|slash| &self.stored[..slash])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::batch::rules::check_batch_id;

    #[test]
    fn a_callers_batch_is_stored_under_its_name() {
        let id = BatchId::of(Some("billing"), "invoices-2026-12");
        assert_eq!(id.stored(), "billing/invoices-2026-12");
        assert_eq!(id.own(), "invoices-2026-12");
        assert_eq!(id.owner(), Some("billing"));
    }

    #[test]
    fn without_keys_the_id_is_stored_as_it_is() {
        for caller in [None, Some("")] {
            let id = BatchId::of(caller, "invoices-2026-12");
            assert_eq!(id.stored(), "invoices-2026-12");
            assert_eq!(id.own(), "invoices-2026-12");
            assert_eq!(id.owner(), None);
        }
    }

    #[test]
    fn two_callers_with_one_id_are_two_batches() {
        let a = BatchId::of(Some("billing-a"), "invoices-2026-12");
        let b = BatchId::of(Some("billing-b"), "invoices-2026-12");
        let open = BatchId::of(None, "invoices-2026-12");
        assert_ne!(a.stored(), b.stored());
        assert_ne!(a.stored(), open.stored());
        assert_eq!(a.own(), b.own());
    }

    #[test]
    fn a_stored_id_reads_back_as_it_was_made() {
        for (caller, own) in [
            (Some("billing"), "invoices-2026-12"),
            (Some("a_b-9"), "x.y:z_1-2"),
            (None, "invoices-2026-12"),
        ] {
            let made = BatchId::of(caller, own);
            let read = BatchId::from_stored(made.stored());
            assert_eq!(read, made);
            assert_eq!((read.owner(), read.own()), (caller, own));
        }
    }

    #[test]
    fn no_id_a_caller_may_send_names_another_callers_batch() {
        // What would reach another caller's batch (or a batch of a kabar without keys) holds a
        // `/`, which no batch id may.
        let forged = "billing-b/invoices-2026-12";
        assert!(check_batch_id(forged).is_err());
        let id = BatchId::of(Some("billing-a"), forged);
        assert_eq!(
            id.own(),
            forged,
            "the batch runs check the id as it was sent"
        );
        assert_ne!(
            id.stored(),
            BatchId::of(Some("billing-b"), "invoices-2026-12").stored()
        );
        assert!(check_batch_id(BatchId::of(None, forged).own()).is_err());
    }

    #[test]
    fn the_stored_id_keeps_one_cluster_slot() {
        // Redis Cluster hashes what is between the first `{` and the next `}`: every key of a
        // batch names the whole stored id there, `/` included.
        let id = BatchId::of(Some("billing"), "invoices-2026-12");
        for key in crate::store::batch_keys(id.stored()) {
            let open = key.find('{').unwrap();
            let close = open + key[open..].find('}').unwrap();
            assert_eq!(&key[open + 1..close], "billing/invoices-2026-12", "{key}");
        }
    }
}
