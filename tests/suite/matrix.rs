//! The same battery through a real mount in every configuration that changes the data
//! path: {writeback cache on, off} × {512 B, 4 KiB, 64 KiB blocks}
//! (gocryptfs keeps such a matrix for the same reason: a bug that lives in one corner),
//! and a few corners again with hidden names (format 4).

use crate::common;

use std::fs::{self, File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;

use common::{pattern, TestVolume, HEADER};

fn battery(writeback: bool, block: u32) {
    run_battery(TestVolume::new(block), writeback, block)
}

/// Where a file of the volume's root is in the backing directory.
fn backing_of(vol: &TestVolume, name: &str) -> std::path::PathBuf {
    let v = vol.open();
    match v.names() {
        Some(_) => vol.backing.join(envelopefs::tools::name_paths::backing_path(&v, name.as_ref()).unwrap()),
        None => vol.backing.join(name),
    }
}

fn run_battery(vol: TestVolume, writeback: bool, block: u32) {
    let stored = block as u64 + 28;
    let mut opts = vec![];
    if !writeback {
        opts.push("--no-writeback-cache");
    }
    let m = vol.mount(&opts);
    let b = block as usize;

    // Round trip of sizes around block edges, across a remount.
    let sizes = [0, 1, b - 1, b, b + 1, 3 * b + 17];
    for (i, n) in sizes.iter().enumerate() {
        fs::write(m.path(&format!("f{i}")), pattern(i as u64, *n)).unwrap();
    }
    assert!(m.unmount().success());
    let m = vol.mount(&opts);
    for (i, n) in sizes.iter().enumerate() {
        let p = m.path(&format!("f{i}"));
        assert_eq!(fs::read(&p).unwrap(), pattern(i as u64, *n), "wb={writeback} {block}: size {n}");
        let backing = fs::metadata(backing_of(&vol, &format!("f{i}"))).unwrap().len();
        let n = *n as u64;
        let want = if n == 0 {
            0
        } else {
            HEADER + n / block as u64 * stored + if n % block as u64 > 0 { n % block as u64 + 28 } else { 0 }
        };
        assert_eq!(backing, want, "size math for {n} bytes");
    }

    // Partial overwrites, appends, truncates up and down, a hole in the middle.
    let p = m.path("edit");
    let mut model = pattern(9, 2 * b + 5);
    fs::write(&p, &model).unwrap();
    let f = OpenOptions::new().read(true).write(true).open(&p).unwrap();
    f.write_all_at(b"middle", b as u64 - 3).unwrap();
    model[b - 3..b + 3].copy_from_slice(b"middle");
    let mut app = OpenOptions::new().append(true).open(&p).unwrap();
    app.write_all(b"tail").unwrap();
    model.extend_from_slice(b"tail");
    f.set_len(b as u64 + 1).unwrap();
    model.truncate(b + 1);
    f.set_len(4 * b as u64).unwrap();
    model.resize(4 * b, 0);
    f.write_all_at(b"end", 4 * b as u64 - 3).unwrap();
    model[4 * b - 3..].copy_from_slice(b"end");
    drop((f, app));
    assert_eq!(fs::read(&p).unwrap(), model, "wb={writeback} {block}: edits");

    // A flipped bit in each block is EIO for that block only; restored, it reads again.
    let data = pattern(3, 3 * b);
    fs::write(m.path("victim"), &data).unwrap();
    let backing = backing_of(&vol, "victim");
    for i in 0..3u64 {
        let off = HEADER + i * stored + 40;
        let f = OpenOptions::new().read(true).write(true).open(&backing).unwrap();
        let mut x = [0u8];
        f.read_exact_at(&mut x, off).unwrap();
        f.write_all_at(&[x[0] ^ 1], off).unwrap();
        if i == 0 {
            // Block 0 vouches for the header at open.
            let e = common::open_fails_once_released(&m.path("victim"), &data);
            assert_eq!(e.raw_os_error(), Some(libc::EIO));
        } else {
            let mut r = File::open(m.path("victim")).unwrap();
            let mut buf = vec![0u8; b];
            r.seek(SeekFrom::Start(i * block as u64)).unwrap();
            assert_eq!(r.read_exact(&mut buf).unwrap_err().raw_os_error(), Some(libc::EIO), "block {i}");
            // Reads reach the daemon a page at a time: blocks sharing the damaged block's
            // page fail with it, blocks in other pages still read.
            if i * block as u64 >= 4096 {
                r.seek(SeekFrom::Start(0)).unwrap();
                r.read_exact(&mut buf).unwrap();
                assert_eq!(buf, data[..b], "block 0 still reads");
            }
        }
        f.write_all_at(&x, off).unwrap();
        assert_eq!(fs::read(m.path("victim")).unwrap(), data);
    }

    // Blocks swapped within the file are EIO.
    let read_block = |i: u64| {
        let mut v = vec![0u8; stored as usize];
        File::open(&backing).unwrap().read_exact_at(&mut v, HEADER + i * stored).unwrap();
        v
    };
    let (b1, b2) = (read_block(1), read_block(2));
    let w = OpenOptions::new().write(true).open(&backing).unwrap();
    w.write_all_at(&b2, HEADER + stored).unwrap();
    w.write_all_at(&b1, HEADER + 2 * stored).unwrap();
    assert_eq!(fs::read(m.path("victim")).unwrap_err().raw_os_error(), Some(libc::EIO));

    // Concurrent writers on shared blocks end with each writer's last round.
    let p = m.path("shared");
    let span = b * 3 / 2 + 7;
    File::create(&p).unwrap().set_len((3 * span) as u64).unwrap();
    std::thread::scope(|s| {
        for wtr in 0..3 {
            let p = p.clone();
            s.spawn(move || {
                let f = OpenOptions::new().write(true).open(&p).unwrap();
                for r in 0..10 {
                    f.write_all_at(&pattern((wtr * 100 + r) as u64, span), (wtr * span) as u64).unwrap();
                }
            });
        }
    });
    let got = fs::read(&p).unwrap();
    for wtr in 0..3 {
        assert_eq!(&got[wtr * span..(wtr + 1) * span], &pattern((wtr * 100 + 9) as u64, span)[..], "writer {wtr}");
    }
    assert!(m.unmount().success());
}

macro_rules! matrix {
    ($($name:ident: $wb:literal, $block:literal;)*) => {
        $(#[test]
        #[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
        fn $name() { battery($wb, $block); })*
    };
}

matrix! {
    writeback_512: true, 512;
    writeback_4k: true, 4096;
    writeback_64k: true, 65536;
    direct_512: false, 512;
    direct_4k: false, 4096;
    direct_64k: false, 65536;
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn writeback_4k_hidden_names() {
    run_battery(TestVolume::hidden(4096), true, 4096);
}

#[test]
#[cfg_attr(not(feature = "fuse_tests"), ignore = "mounts through FUSE as root: --features fuse_tests")]
fn direct_512_hidden_names() {
    run_battery(TestVolume::hidden(512), false, 512);
}
