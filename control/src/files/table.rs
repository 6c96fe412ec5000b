//! Where a filesystem lies on a disk: the partition table (GPT, or MBR with its extended
//! partitions), and what a region holds, named by its magic (`xfs`, `btrfs`, an LVM physical
//! volume, ...), so that a disk we cannot read says what it is.
//!
//! Parsed here rather than with the `gpt` (4.1) and `mbrman` (0.6) crates: `gpt` opens only a
//! `Read + Write + Seek` device and reads the backup header at the disk's end before the
//! primary is used; `mbrman` adds the EBR chain's 32-bit sector numbers unchecked (an overflow
//! on a hostile chain) and walks a chain of any length. Every number here comes from the
//! tenant's disk: each is checked against the disk's size, every sum is checked, the logical
//! partitions of an MBR are at most [`MAX_LOGICAL`], and a GPT's table at most 1 MiB.

use super::{Error, Image};

pub const SECTOR: u64 = 512;
/// Logical partitions of an MBR's extended partition read at most.
pub const MAX_LOGICAL: usize = 128;
/// The largest GPT partition entry array read (the usual one is 16 KiB).
const MAX_GPT_TABLE: u64 = 1 << 20;

/// A range of the disk: a partition, or the whole disk.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Region {
    /// 1-based partition number (GPT entry index + 1; MBR 1–4 primary, 5… logical); `None`:
    /// the whole disk.
    pub number: Option<u32>,
    pub start: u64,
    pub len: u64,
    /// The partition type, as a person reads it (`linux`, `efi`, `0x83`, a GUID).
    pub kind: String,
}

impl Region {
    /// How messages name it: "partition 2" or "the disk".
    pub fn name(&self) -> String {
        match self.number {
            Some(n) => format!("partition {n}"),
            None => "the disk".to_owned(),
        }
    }
}

/// The partition table a disk has.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableKind {
    Gpt,
    Mbr,
}

impl std::fmt::Display for TableKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            TableKind::Gpt => "GPT",
            TableKind::Mbr => "MBR",
        })
    }
}

/// Why a partition table was refused.
#[derive(Debug, thiserror::Error)]
pub enum TableError {
    #[error("The GPT header's checksum is wrong")]
    GptHeaderChecksum,
    #[error("The GPT partition entries' checksum is wrong")]
    GptEntriesChecksum,
    #[error("The GPT header is {0} bytes, outside 92 to 512")]
    GptHeaderSize(u32),
    #[error("The GPT partition entry size {0} is not a multiple of 128 from 128 to 4096")]
    GptEntrySize(u32),
    #[error("The GPT partition entries ({count} of {size} bytes from sector {lba}) are past the disk's end or larger than 1 MiB")]
    GptEntries { lba: u64, count: u32, size: u32 },
    #[error("Partition {number} (sectors {first} to {last}) ends past the disk's end ({sectors} sectors) or ends before it starts")]
    OutsideDisk { number: u32, first: u64, last: u64, sectors: u64 },
    #[error("The extended partition's chain of logical partitions is longer than {MAX_LOGICAL} or loops")]
    LongChain,
}

/// The disk's partition table and its partitions (empty entries left out), or `None` when the
/// disk has no table.
pub fn partitions(img: &dyn Image) -> Result<Option<(TableKind, Vec<Region>)>, Error> {
    let size = img.size();
    if size < 2 * SECTOR {
        return Ok(None);
    }
    let mut mbr = [0u8; SECTOR as usize];
    img.read_exact_at(&mut mbr, 0)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(None);
    }
    let entries = mbr_entries(&mbr);
    // A filesystem on the whole disk may carry 0x55AA at 510 too (FAT's boot sector; ext4
    // leaves the first 1 KiB alone, so its boot code could): an MBR is believed only when its
    // entries make sense.
    if entries.iter().any(|e| e.kind == 0xEE) {
        let mut hdr = [0u8; SECTOR as usize];
        img.read_exact_at(&mut hdr, SECTOR)?;
        if &hdr[0..8] == b"EFI PART" {
            return gpt(img, &hdr).map(|p| Some((TableKind::Gpt, p))).map_err(Error::Table);
        }
    }
    if entries.iter().all(|e| e.kind == 0) || entries.iter().any(|e| e.boot & 0x7F != 0) {
        return Ok(None);
    }
    mbr_partitions(img, &entries).map(|p| Some((TableKind::Mbr, p)))
}

#[derive(Clone, Copy, Debug)]
struct MbrEntry {
    boot: u8,
    kind: u8,
    lba: u32,
    sectors: u32,
}

fn le32(b: &[u8], at: usize) -> u32 {
    let mut x = [0u8; 4];
    x.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(x)
}

fn le64(b: &[u8], at: usize) -> u64 {
    let mut x = [0u8; 8];
    x.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(x)
}

fn mbr_entries(sector: &[u8; SECTOR as usize]) -> [MbrEntry; 4] {
    std::array::from_fn(|i| {
        let e = &sector[446 + 16 * i..446 + 16 * (i + 1)];
        MbrEntry { boot: e[0], kind: e[4], lba: le32(e, 8), sectors: le32(e, 12) }
    })
}

fn mbr_kind(kind: u8) -> String {
    match kind {
        0x83 => "linux (0x83)".to_owned(),
        0x8e => "linux lvm (0x8e)".to_owned(),
        0x82 => "linux swap (0x82)".to_owned(),
        0xfd => "linux raid (0xfd)".to_owned(),
        0x07 => "ntfs/exfat (0x07)".to_owned(),
        0x0b | 0x0c => format!("fat32 ({kind:#04x})"),
        0xef => "efi (0xef)".to_owned(),
        k => format!("{k:#04x}"),
    }
}

fn is_extended(kind: u8) -> bool {
    matches!(kind, 0x05 | 0x0f | 0x85)
}

fn region(number: u32, lba: u64, sectors: u64, kind: String, disk_sectors: u64) -> Result<Region, Error> {
    let last = lba.checked_add(sectors).and_then(|e| e.checked_sub(1));
    match last {
        Some(last) if sectors > 0 && last < disk_sectors => {
            Ok(Region { number: Some(number), start: lba * SECTOR, len: sectors * SECTOR, kind })
        }
        _ => Err(Error::Table(TableError::OutsideDisk {
            number,
            first: lba,
            last: lba.saturating_add(sectors).saturating_sub(1),
            sectors: disk_sectors,
        })),
    }
}

fn mbr_partitions(img: &dyn Image, entries: &[MbrEntry; 4]) -> Result<Vec<Region>, Error> {
    let disk_sectors = img.size() / SECTOR;
    let mut out = Vec::new();
    for (i, e) in entries.iter().enumerate() {
        if e.kind == 0 || e.sectors == 0 {
            continue;
        }
        let number = i as u32 + 1;
        let r = region(number, u64::from(e.lba), u64::from(e.sectors), mbr_kind(e.kind), disk_sectors)?;
        if is_extended(e.kind) {
            logical(img, u64::from(e.lba), disk_sectors, &mut out)?;
        } else {
            out.push(r);
        }
    }
    out.sort_by_key(|r| r.number);
    Ok(out)
}

/// The logical partitions of the extended partition at sector `ext`: a chain of EBRs, each
/// giving one partition (relative to itself) and the next EBR (relative to `ext`).
fn logical(img: &dyn Image, ext: u64, disk_sectors: u64, out: &mut Vec<Region>) -> Result<(), Error> {
    let mut ebr = ext;
    let mut seen = Vec::new();
    for n in 0..=MAX_LOGICAL {
        if seen.contains(&ebr) || n == MAX_LOGICAL {
            return Err(Error::Table(TableError::LongChain));
        }
        seen.push(ebr);
        let mut sector = [0u8; SECTOR as usize];
        if ebr >= disk_sectors {
            let number = 5 + n as u32;
            return Err(Error::Table(TableError::OutsideDisk { number, first: ebr, last: ebr, sectors: disk_sectors }));
        }
        img.read_exact_at(&mut sector, ebr * SECTOR)?;
        if sector[510..512] != [0x55, 0xAA] {
            // An empty extended partition need not hold an EBR; a broken link ends the chain.
            return Ok(());
        }
        let [part, next, ..] = mbr_entries(&sector);
        if part.kind != 0 && part.sectors != 0 {
            let number = 5 + n as u32;
            let lba = ebr.saturating_add(u64::from(part.lba));
            out.push(region(number, lba, u64::from(part.sectors), mbr_kind(part.kind), disk_sectors)?);
        }
        if next.kind == 0 || next.lba == 0 {
            return Ok(());
        }
        ebr = ext.saturating_add(u64::from(next.lba));
    }
    Err(Error::Table(TableError::LongChain))
}

fn guid(b: &[u8]) -> String {
    format!(
        "{:08X}-{:04X}-{:04X}-{:02X}{:02X}-{:02X}{:02X}{:02X}{:02X}{:02X}{:02X}",
        le32(b, 0),
        u16::from_le_bytes([b[4], b[5]]),
        u16::from_le_bytes([b[6], b[7]]),
        b[8],
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

fn gpt_kind(g: &str) -> String {
    let name = match g {
        "0FC63DAF-8483-4772-8E79-3D69D8477DE4" => "linux",
        "C12A7328-F81F-11D2-BA4B-00A0C93EC93B" => "efi",
        "E6D6D379-F507-44C2-A23C-238F2A3DF928" => "linux lvm",
        "0657FD6D-A4AB-43C4-84E5-0933C84B4F4F" => "linux swap",
        "21686148-6449-6E6F-744E-656564454649" => "bios boot",
        "4F68BCE3-E8CD-4DB1-96E7-FBCAF984B709" => "linux root (x86-64)",
        "933AC7E1-2EB4-4F13-B844-0E14E2AEF915" => "linux home",
        "A19D880F-05FC-4D3B-A006-743F0F84911E" => "linux raid",
        "EBD0A0A2-B9E5-4433-87C0-68B6B72699C7" => "microsoft basic data",
        _ => return g.to_owned(),
    };
    name.to_owned()
}

/// The partitions of the GPT whose header (LBA 1) is `hdr`.
fn gpt(img: &dyn Image, hdr: &[u8; SECTOR as usize]) -> Result<Vec<Region>, TableError> {
    let hsize = le32(hdr, 12);
    if !(92..=512).contains(&hsize) {
        return Err(TableError::GptHeaderSize(hsize));
    }
    let mut h = hdr[..hsize as usize].to_vec();
    let crc = le32(&h, 16);
    h[16..20].fill(0);
    if crc32fast::hash(&h) != crc {
        return Err(TableError::GptHeaderChecksum);
    }
    let (lba, count, esize) = (le64(hdr, 72), le32(hdr, 80), le32(hdr, 84));
    if !(128..=4096).contains(&esize) || esize % 128 != 0 {
        return Err(TableError::GptEntrySize(esize));
    }
    let disk_sectors = img.size() / SECTOR;
    let bytes = u64::from(count) * u64::from(esize);
    let fits = lba.checked_mul(SECTOR).and_then(|s| s.checked_add(bytes)).is_some_and(|end| end <= img.size());
    if bytes > MAX_GPT_TABLE || !fits {
        return Err(TableError::GptEntries { lba, count, size: esize });
    }
    let mut table = vec![0u8; bytes as usize];
    img.read_exact_at(&mut table, lba * SECTOR).map_err(|_| TableError::GptEntries { lba, count, size: esize })?;
    if crc32fast::hash(&table) != le32(hdr, 88) {
        return Err(TableError::GptEntriesChecksum);
    }
    let mut out = Vec::new();
    for (i, e) in table.chunks_exact(esize as usize).enumerate() {
        if e[0..16].iter().all(|&b| b == 0) {
            continue;
        }
        let number = i as u32 + 1;
        let (first, last) = (le64(e, 32), le64(e, 40));
        if last < first || last >= disk_sectors {
            return Err(TableError::OutsideDisk { number, first, last, sectors: disk_sectors });
        }
        out.push(Region {
            number: Some(number),
            start: first * SECTOR,
            len: (last - first + 1) * SECTOR,
            kind: gpt_kind(&guid(e)),
        });
    }
    Ok(out)
}

/// What a region holds, by its magic: `None` when nothing known is found. Reads at most the
/// first 68 KiB of the region.
pub fn signature(img: &dyn Image, start: u64, len: u64) -> Result<Option<&'static str>, Error> {
    let want = len.min(0x11000) as usize;
    let mut b = vec![0u8; want];
    img.read_exact_at(&mut b, start)?;
    let at = |off: usize, magic: &[u8]| b.get(off..off + magic.len()) == Some(magic);
    let found = if at(1080, &[0x53, 0xEF]) {
        "ext4"
    } else if at(0, b"XFSB") {
        "xfs"
    } else if at(0x10040, b"_BHRfS_M") {
        "btrfs"
    } else if at(512 + 24, b"LVM2 001") || at(24, b"LVM2 001") {
        "an LVM physical volume"
    } else if at(0, b"LUKS\xba\xbe") {
        "LUKS (encrypted)"
    } else if at(4086, b"SWAPSPACE2") || at(4086, b"SWAP-SPACE") {
        "swap"
    } else if at(3, b"NTFS    ") {
        "ntfs"
    } else if at(3, b"EXFAT   ") {
        "exfat"
    } else if at(82, b"FAT32   ") || at(54, b"FAT16   ") || at(54, b"FAT12   ") {
        "vfat"
    } else if at(0, b"hsqs") {
        "squashfs"
    } else if at(1024, &[0x10, 0x20, 0xF5, 0xF2]) {
        "f2fs"
    } else if at(0x10034, b"ReIsEr") {
        "reiserfs"
    } else if at(0, &[0xa9, 0x2b, 0x4e, 0x80]) || at(0, &[0xa0, 0x2b, 0x4e, 0x80]) {
        "an md RAID member"
    } else if at(512, b"EFI PART") {
        "a GPT partition table"
    } else if b.iter().all(|&x| x == 0) {
        "nothing (zeros)"
    } else {
        return Ok(None);
    };
    Ok(Some(found))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn mbr_with(entries: &[(u8, u32, u32)]) -> Vec<u8> {
        let mut d = vec![0u8; 64 << 20];
        for (i, &(kind, lba, sectors)) in entries.iter().enumerate() {
            let e = &mut d[446 + 16 * i..446 + 16 * (i + 1)];
            e[4] = kind;
            e[8..12].copy_from_slice(&lba.to_le_bytes());
            e[12..16].copy_from_slice(&sectors.to_le_bytes());
        }
        d[510] = 0x55;
        d[511] = 0xAA;
        d
    }

    #[test]
    fn mbr_primary_and_logical_partitions_are_numbered_like_linux() {
        // 1: linux at 2048; 2: extended from 40960 holding two logical partitions.
        let mut d = mbr_with(&[(0x83, 2048, 20480), (0x05, 40960, 40960)]);
        let ebr = |d: &mut Vec<u8>, at: u64, part: (u8, u32, u32), next: u32| {
            let s = (at * SECTOR) as usize;
            d[s + 446 + 4] = part.0;
            d[s + 446 + 8..s + 446 + 12].copy_from_slice(&part.1.to_le_bytes());
            d[s + 446 + 12..s + 446 + 16].copy_from_slice(&part.2.to_le_bytes());
            if next != 0 {
                d[s + 462 + 4] = 0x05;
                d[s + 462 + 8..s + 462 + 12].copy_from_slice(&next.to_le_bytes());
                d[s + 462 + 12..s + 462 + 16].copy_from_slice(&1000u32.to_le_bytes());
            }
            d[s + 510] = 0x55;
            d[s + 511] = 0xAA;
        };
        ebr(&mut d, 40960, (0x83, 2048, 8192), 12288);
        ebr(&mut d, 40960 + 12288, (0x82, 2048, 4096), 0);
        let (kind, parts) = partitions(&d).unwrap().unwrap();
        assert_eq!(kind, TableKind::Mbr);
        let got: Vec<_> = parts.iter().map(|r| (r.number.unwrap(), r.start / SECTOR, r.len / SECTOR)).collect();
        assert_eq!(got, vec![(1, 2048, 20480), (5, 40960 + 2048, 8192), (6, 40960 + 12288 + 2048, 4096)]);

        // A chain that points back at itself is refused, not walked forever.
        ebr(&mut d, 40960 + 12288, (0x82, 2048, 4096), 12288);
        assert!(matches!(partitions(&d), Err(Error::Table(TableError::LongChain))), "{:?}", partitions(&d));
    }

    #[test]
    fn a_partition_past_the_disks_end_is_refused_naming_it() {
        let d = mbr_with(&[(0x83, 2048, u32::MAX)]);
        let e = partitions(&d).unwrap_err();
        assert!(matches!(e, Error::Table(TableError::OutsideDisk { number: 1, .. })), "{e}");
        let chain = livesnap_proto::error::chain(&e);
        assert!(chain.contains("Partition 1 (sectors 2048 to"), "{chain}");
    }

    #[test]
    fn no_table_on_zeros_or_a_bare_filesystem() {
        assert!(partitions(&vec![0u8; 1 << 20]).unwrap().is_none());
        // Boot-sector bytes with 0x55AA but entries that are not partitions (boot flag 0x12).
        let mut d = mbr_with(&[(0x83, 1, 10)]);
        d[446] = 0x12;
        assert!(partitions(&d).unwrap().is_none());
    }

    #[test]
    fn signatures_name_what_they_find() {
        let mut d = vec![0u8; 1 << 20];
        assert_eq!(signature(&d, 0, 1 << 20).unwrap(), Some("nothing (zeros)"));
        d[0..4].copy_from_slice(b"XFSB");
        assert_eq!(signature(&d, 0, 1 << 20).unwrap(), Some("xfs"));
        let mut d = vec![1u8; 1 << 20];
        d[0x10040..0x10048].copy_from_slice(b"_BHRfS_M");
        assert_eq!(signature(&d, 0, 1 << 20).unwrap(), Some("btrfs"));
        let mut d = vec![7u8; 1 << 20];
        d[512 + 24..512 + 32].copy_from_slice(b"LVM2 001");
        assert_eq!(signature(&d, 0, 1 << 20).unwrap(), Some("an LVM physical volume"));
        assert_eq!(signature(&vec![7u8; 1 << 20], 0, 1 << 20).unwrap(), None);
        // A region shorter than the magic's offset is read only to its end.
        assert_eq!(signature(&vec![0u8; 100], 0, 100).unwrap(), Some("nothing (zeros)"));
    }
}
