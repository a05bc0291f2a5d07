//! The blob-memory budget: how many bytes of fetched blob payloads the processor holds at once
//! (`max_blob_memory`, across every batch its workers run), and how a batch whose blobs alone
//! pass it is cut into groups that fit.

use std::sync::Arc;

use tokio::sync::{Semaphore, SemaphorePermit};

/// Blob payload bytes one store transaction carries at most (a single larger payload goes
/// alone). A database client keeps the buffer it encoded its largest statement into for the
/// life of the connection (sqlx's PostgreSQL write buffer never shrinks), so a statement of
/// 128 MiB of payloads would leave every pooled connection holding that much after a flood.
pub(crate) const MAX_GROUP_BLOB_BYTES: u64 = 16 * 1024 * 1024;

/// The budget is counted in KiB, so that a `u32` of permits covers terabytes.
const BUDGET_UNIT: u64 = 1024;

/// Permits of [`BUDGET_UNIT`] bytes; clones share them.
#[derive(Clone, Debug)]
pub(crate) struct BlobBudget {
    permits: Arc<Semaphore>,
    size: u32,
}

impl BlobBudget {
    pub(crate) fn new(max_bytes: usize) -> Self {
        let size = u32::try_from(units(max_bytes as u64))
            .unwrap_or(u32::MAX)
            .max(1);
        Self {
            permits: Arc::new(Semaphore::new(size as usize)),
            size,
        }
    }

    /// Waits until `bytes` fit, and holds them until the permit is dropped. More bytes than
    /// the whole budget (a single payload over it) take all of it. Nothing for zero bytes.
    pub(crate) async fn hold(&self, bytes: u64) -> Option<SemaphorePermit<'_>> {
        if bytes == 0 {
            return None;
        }
        let wanted = u32::try_from(units(bytes))
            .unwrap_or(u32::MAX)
            .min(self.size);
        // The semaphore is never closed, so acquiring cannot fail.
        self.permits.acquire_many(wanted).await.ok()
    }
}

fn units(bytes: u64) -> u64 {
    bytes.div_ceil(BUDGET_UNIT)
}

/// Splits a batch's items into groups whose blob payloads fit in `budget` bytes together,
/// keeping their order. `blob_size` gives an item's blob payload size (its declared size), or
/// `None` for an item already in memory with its message (inline), which goes with the first
/// group. Every group holds at least one item.
pub(crate) fn groups_within<T>(
    items: Vec<T>,
    budget: u64,
    blob_size: impl Fn(&T) -> Option<u64>,
) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = vec![Vec::new()];
    let mut blob_bytes = 0u64;
    let (inline, blob): (Vec<_>, Vec<_>) = items
        .into_iter()
        .partition(|item| blob_size(item).is_none());
    groups[0].extend(inline);
    for item in blob {
        let size = blob_size(&item).unwrap_or(0);
        if blob_bytes > 0 && blob_bytes.saturating_add(size) > budget {
            groups.push(Vec::new());
            blob_bytes = 0;
        }
        blob_bytes = blob_bytes.saturating_add(size);
        groups.last_mut().expect("groups is never empty").push(item);
    }
    groups.retain(|group| !group.is_empty());
    groups
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inline_items_go_first_and_blobs_are_grouped_in_order_within_the_budget() {
        // (name, blob size or None for inline)
        let items = vec![
            ("a", Some(6)),
            ("i", None),
            ("b", Some(5)),
            ("c", Some(20)),
            ("d", Some(1)),
        ];
        let groups = groups_within(items, 10, |item| item.1);
        let names: Vec<Vec<&str>> = groups
            .iter()
            .map(|group| group.iter().map(|item| item.0).collect())
            .collect();
        assert_eq!(names, [vec!["i", "a"], vec!["b"], vec!["c"], vec!["d"]]);
    }

    #[tokio::test]
    async fn more_bytes_than_the_whole_budget_take_all_of_it_and_zero_take_nothing() {
        let budget = BlobBudget::new(4096);
        assert!(budget.hold(0).await.is_none());
        let all = budget.hold(1 << 40).await.expect("a permit");
        assert_eq!(all.num_permits(), 4);
        assert_eq!(budget.permits.available_permits(), 0);
        drop(all);
        assert_eq!(budget.permits.available_permits(), 4);
    }
}
