//! A regular file's header region as read from the backing directory: decoding never
//! panics, and every slot that decodes re-encodes to exactly its own bytes (the decoder
//! accepts nothing the encoder would not write).
#![no_main]

use envelopefs::format::{decode_region, decode_slot, SlotView};
use libfuzzer_sys::fuzz_target;

fn round_trip(slot: &[u8], view: &SlotView) {
    let again = view.header.encode_slot(slot.len(), |_| view.tag).expect("a decoded header re-encodes");
    assert!(again == slot, "slot does not re-encode to its own bytes:\n input {slot:02x?}\n again {again:02x?}");
    assert_eq!(&again[..view.authenticated.len()], &view.authenticated[..]);
}

fuzz_target!(|data: &[u8]| {
    // The input as one slot.
    if let Ok(view) = decode_slot(data) {
        round_trip(data, &view);
    }
    // The input as a header region: two halves, decodable ones first, newest first.
    let half = data.len() / 2;
    let order = decode_region(data);
    assert_eq!(order.iter().map(|(i, _)| i).sum::<usize>(), 1, "both slots, once each");
    for (idx, slot) in &order {
        let bytes = if *idx == 0 { &data[..half] } else { &data[half..] };
        assert_eq!(slot.as_ref().map(|v| &v.header), decode_slot(bytes).as_ref().map(|v| &v.header));
        if let Ok(view) = slot {
            round_trip(bytes, view);
        }
    }
    let key = |s: &(usize, Result<SlotView, _>)| match &s.1 {
        Ok(v) => (0, u64::MAX - v.header.generation, s.0),
        Err(_) => (1, 0, s.0),
    };
    assert!(key(&order[0]) <= key(&order[1]), "region order: decodable first, newest first, slot 0 on a tie");
});
