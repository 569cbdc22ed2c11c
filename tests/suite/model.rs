//! Model test of the block layer: random writes, truncates, fallocates, reads and reopens
//! through `EncryptedFs` (no mount) must always agree with a plain `Vec<u8>`.

use crate::common;

use std::ffi::OsStr;

use common::{pattern, TestVolume};
use envelopefs::fs::{Caller, SetAttr, ROOT_INO};
use proptest::prelude::*;

#[derive(Clone, Debug)]
enum Op {
    Write { off: u64, len: usize, seed: u64 },
    Truncate(u64),
    Fallocate { off: u64, len: u64 },
    Read { off: u64, len: u32 },
    Reopen,
}

fn ops(max: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        4 => (0..max, 1..(max as usize / 2), any::<u64>()).prop_map(|(off, len, seed)| Op::Write { off, len, seed }),
        2 => (0..max).prop_map(Op::Truncate),
        1 => (0..max, 1..max / 2).prop_map(|(off, len)| Op::Fallocate { off, len }),
        2 => (0..max, 1..(max as u32)).prop_map(|(off, len)| Op::Read { off, len }),
        1 => Just(Op::Reopen),
    ];
    proptest::collection::vec(op, 1..40)
}

fn run(block_size: u32, ops: Vec<Op>) -> Result<(), TestCaseError> {
    let vol = TestVolume::new(block_size);
    let fs = vol.fs();
    let caller = Caller { uid: 0, gid: 0, pid: 1 };
    let (attr, mut fh) = fs.create(ROOT_INO, OsStr::new("f"), 0o644, 0, libc::O_RDWR, caller).unwrap();
    let mut model: Vec<u8> = Vec::new();
    for op in ops {
        match op {
            Op::Write { off, len, seed } => {
                let data = pattern(seed, len);
                prop_assert_eq!(fs.write(fh, off, &data, caller).unwrap() as usize, len);
                let end = off as usize + len;
                if model.len() < end {
                    model.resize(end, 0);
                }
                model[off as usize..end].copy_from_slice(&data);
            }
            Op::Truncate(size) => {
                fs.setattr(attr.ino, SetAttr { size: Some(size), fh: Some(fh), ..Default::default() }, caller).unwrap();
                model.resize(size as usize, 0);
            }
            Op::Fallocate { off, len } => {
                fs.fallocate(fh, off, len, 0, caller).unwrap();
                let end = (off + len) as usize;
                if model.len() < end {
                    model.resize(end, 0);
                }
            }
            Op::Read { off, len } => {
                let got = fs.read(fh, off, len).unwrap();
                let from = (off as usize).min(model.len());
                let to = (off as usize + len as usize).min(model.len());
                prop_assert_eq!(&got[..], &model[from..to]);
            }
            Op::Reopen => {
                fs.release(fh);
                fh = fs.open(attr.ino, libc::O_RDWR, caller).unwrap();
            }
        }
        prop_assert_eq!(fs.getattr(attr.ino).unwrap().size, model.len() as u64);
    }
    let all = fs.read(fh, 0, model.len() as u32 + 10).unwrap();
    prop_assert_eq!(all, model);
    fs.release(fh);
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn block_layer_matches_a_vec_512(ops in ops(512 * 6)) {
        run(512, ops)?;
    }

    #[test]
    fn block_layer_matches_a_vec_4k(ops in ops(4096 * 5)) {
        run(4096, ops)?;
    }

    #[test]
    fn block_layer_matches_a_vec_64k(ops in ops(65536 * 3)) {
        run(65536, ops)?;
    }
}
