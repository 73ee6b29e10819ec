//! Node-unique ids: a key sequence on node `n` hands out `n`, `n + SLOTS`, `n + 2 * SLOTS`...
//! so ids made on different nodes never meet (see the extension's `sync_global_ids`).

/// How many nodes can have node-unique ids (node numbers 1 to `SLOTS - 1`).
pub const SLOTS: i64 = 1024;

/// The first value above `floor` equal to `node` modulo `SLOTS`.
pub fn first_id(floor: i64, node: i64) -> i64 {
    let id = floor - floor.rem_euclid(SLOTS) + node;
    if id > floor { id } else { id + SLOTS }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_ids_end_in_the_node_number_above_the_floor() {
        assert_eq!(first_id(0, 3), 3);
        assert_eq!(first_id(3, 3), 1027);
        assert_eq!(first_id(2, 3), 3);
        assert_eq!(first_id(5000, 7), 5127);
        for (floor, node) in [(0, 1), (1023, 1023), (1024, 1), (99_999, 512)] {
            let id = first_id(floor, node);
            assert!(id > floor && id - floor <= SLOTS && id % SLOTS == node, "{floor} {node} -> {id}");
        }
    }
}
