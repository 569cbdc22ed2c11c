use super::*;

const VID: &str = "00112233445566778899aabbccddeeff";

fn journal(dir: &Path, limit: u64) -> Arc<Journal> {
    Journal::create(dir, VID, VID, dir, Mode::Ordered, limit, None).unwrap()
}

fn file(id: u8) -> (FileId, impl Fn() -> Vec<u8>) {
    ([id; 16], move || format!("dir/f{id}").into_bytes())
}

#[test]
fn newest_change_per_file_wins_and_kinds_round_trip() {
    let d = tempfile::tempdir().unwrap();
    let j = journal(d.path(), DEFAULT_LIMIT);
    let (id1, p1) = file(1);
    let (id2, p2) = file(2);
    let f1 = FileRef { file_id: id1, ino: 11, path: &p1 };
    let f2 = FileRef { file_id: id2, ino: 22, path: &p2 };
    let data = vec![7u8; 300];
    let append = Change { offset: 100, bytes: &data, chunks: &[100, 200], old_len: 100, then_len: None };
    drop(j.record(&f1, &append).unwrap());
    let over = Change { offset: 50, bytes: &data[..10], chunks: &[10], old_len: 400, then_len: Some(60) };
    drop(j.record(&f2, &over).unwrap());
    let cut = Change { offset: 0, bytes: &[], chunks: &[], old_len: 400, then_len: Some(4) };
    drop(j.record(&f1, &cut).unwrap());
    let p = read(d.path(), VID, VID).unwrap();
    assert_eq!(p.len(), 2);
    assert_eq!(p[0].file_id, id2);
    assert_eq!(p[0].ino, 22);
    assert_eq!(p[0].path, b"dir/f2");
    assert_eq!(p[0].change, Recorded::Overwrite { offset: 50, bytes: vec![7; 10], result_len: 60 });
    assert_eq!(p[1].change, Recorded::SetLen { len: 4 });
    drop(j.record(&f2, &append).unwrap());
    let p = read(d.path(), VID, VID).unwrap();
    let crc = |n| crc32fast::hash(&vec![7u8; n]);
    let want = Recorded::Append { offset: 100, chunks: vec![(100, crc(100)), (200, crc(200))], result_len: 400 };
    assert_eq!(p.iter().find(|p| p.file_id == id2).unwrap().change, want);
}

#[test]
fn sync_writers_that_arrive_during_a_flush_share_the_next_one() {
    let d = tempfile::tempdir().unwrap();
    let j = Journal::create(d.path(), VID, VID, d.path(), Mode::Sync, DEFAULT_LIMIT, None).unwrap();
    // Hold the flush as if one were running, while four writers record.
    let gate = j.flushing.lock().unwrap();
    let writers: Vec<_> = (0..4u8)
        .map(|i| {
            let j = j.clone();
            std::thread::spawn(move || {
                let (id, p) = file(10 + i);
                let f = FileRef { file_id: id, ino: i as u64, path: &p };
                let data = [i; 32];
                let change = Change { offset: 0, bytes: &data, chunks: &[32], old_len: 32, then_len: None };
                drop(j.record(&f, &change).unwrap());
            })
        })
        .collect();
    while j.state.lock().unwrap().inflight[0] < 4 {
        std::thread::yield_now();
    }
    drop(gate);
    for w in writers {
        w.join().unwrap();
    }
    assert_eq!(j.flushes(), 1, "one fdatasync covered the four records");
    assert_eq!(read(d.path(), VID, VID).unwrap().len(), 4);
}

#[test]
fn a_torn_last_record_is_ignored_and_the_one_before_stands() {
    let d = tempfile::tempdir().unwrap();
    let j = journal(d.path(), DEFAULT_LIMIT);
    let (id, p) = file(3);
    let f = FileRef { file_id: id, ino: 3, path: &p };
    let data = vec![1u8; 64];
    drop(j.record(&f, &Change { offset: 0, bytes: &data, chunks: &[64], old_len: 64, then_len: None }).unwrap());
    let before = std::fs::metadata(&paths(d.path(), VID)[0]).unwrap().len();
    drop(j.record(&f, &Change { offset: 8, bytes: &data, chunks: &[64], old_len: 64, then_len: None }).unwrap());
    let after = std::fs::metadata(&paths(d.path(), VID)[0]).unwrap().len();
    for cut in before..after {
        let raw = std::fs::read(&paths(d.path(), VID)[0]).unwrap();
        let t = tempfile::tempdir().unwrap();
        std::fs::write(&paths(t.path(), VID)[0], &raw[..cut as usize]).unwrap();
        let p = read(t.path(), VID, VID).unwrap();
        assert_eq!(p.len(), 1, "cut at {cut}");
        assert!(matches!(&p[0].change, Recorded::Overwrite { offset: 0, .. }), "cut at {cut}");
    }
}

#[test]
fn a_journal_of_another_volume_or_not_a_journal_is_refused() {
    let d = tempfile::tempdir().unwrap();
    drop(journal(d.path(), DEFAULT_LIMIT));
    let other = "ffeeddccbbaa99887766554433221100";
    std::fs::rename(&paths(d.path(), VID)[0], &paths(d.path(), other)[0]).unwrap();
    assert_eq!(read(d.path(), other, other).unwrap_err().errno(), libc::EIO);
    std::fs::write(&paths(d.path(), VID)[0], b"not a journal at all, no").unwrap();
    assert_eq!(read(d.path(), VID, VID).unwrap_err().errno(), libc::EIO);
}

#[test]
fn checkpoint_empties_the_full_file_and_recording_goes_on_in_the_other() {
    let d = tempfile::tempdir().unwrap();
    let j = journal(d.path(), 1000);
    let (id, p) = file(4);
    let f = FileRef { file_id: id, ino: 4, path: &p };
    let data = vec![2u8; 600];
    for _ in 0..2 {
        drop(j.record(&f, &Change { offset: 0, bytes: &data, chunks: &[600], old_len: 600, then_len: None }).unwrap());
    }
    // The second record crossed the limit: a background checkpoint empties file 0.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while std::fs::metadata(&paths(d.path(), VID)[0]).unwrap().len() != HEADER_LEN {
        assert!(std::time::Instant::now() < deadline, "checkpoint did not happen");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    assert!(read(d.path(), VID, VID).unwrap().is_empty());
    drop(j.record(&f, &Change { offset: 0, bytes: &[], chunks: &[], old_len: 600, then_len: Some(5) }).unwrap());
    let p = read(d.path(), VID, VID).unwrap();
    assert_eq!((p.len(), &p[0].path[..]), (1, &b"dir/f4"[..]), "the path record is repeated in the new file");
    j.close().unwrap();
    assert!(!exists(d.path(), VID));
}
