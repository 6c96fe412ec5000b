//! Raw images: a regular file or a block device, read and written in place.

use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileTypeExt;

use super::{check_range, total_len, Buf, DiskFile, Format, Result};
use crate::sys;

/// Largest piece written at once when zeroes have to be written out by hand.
const ZERO_CHUNK: u64 = 1 << 20;

#[derive(Debug)]
pub struct RawDisk {
    file: File,
    size: u64,
    block_device: bool,
}

impl RawDisk {
    pub fn new(mut file: File, _readonly: bool) -> Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        // Seeking to the end gives the size of regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawDisk { file, size, block_device })
    }

    fn transfer(&self, bufs: &[Buf<'_>], offset: u64, write: bool) -> Result<()> {
        check_range(self.size, offset, total_len(bufs))?;
        // Guards keep the guest pages' pointers valid (and dirty-tracked) for the syscall.
        let guards: Vec<_> = bufs.iter().map(|b| (b.ptr_guard_mut(), b.len())).collect();
        let mut iovs: Vec<libc::iovec> = guards
            .iter()
            .map(|(g, len)| libc::iovec { iov_base: g.as_ptr().cast(), iov_len: *len })
            .collect();
        // SAFETY: each iovec covers exactly one `Buf`, a slice of mapped memory that `guards`
        // keeps alive until the call returns.
        unsafe { sys::pv_all(&self.file, &mut iovs, offset, write) }?;
        Ok(())
    }

    fn write_zero_bytes(&self, mut offset: u64, len: u64) -> Result<()> {
        let end = offset + len;
        let mut zeroes = vec![0u8; len.min(ZERO_CHUNK) as usize];
        while offset < end {
            let n = (end - offset).min(ZERO_CHUNK) as usize;
            let buf = Buf::from(&mut zeroes[..n]);
            self.transfer(&[buf], offset, true)?;
            offset += n as u64;
        }
        Ok(())
    }
}

fn unsupported(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EOPNOTSUPP) | Some(libc::ENOTTY) | Some(libc::EINVAL))
}

impl DiskFile for RawDisk {
    fn size(&self) -> u64 {
        self.size
    }

    fn format(&self) -> Format {
        Format::Raw
    }

    fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()> {
        self.transfer(bufs, offset, false)
    }

    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()> {
        self.transfer(bufs, offset, true)
    }

    fn flush(&self) -> Result<()> {
        Ok(self.file.sync_data()?)
    }

    fn discard(&self, offset: u64, len: u64) -> Result<()> {
        check_range(self.size, offset, len)?;
        let res = if self.block_device {
            sys::blk_range_ioctl(&self.file, false, offset, len)
        } else {
            sys::fallocate(&self.file, libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE, offset, len)
        };
        match res {
            // Discard is a hint: a disk that cannot free space keeps the data.
            Err(e) if unsupported(&e) => Ok(()),
            r => Ok(r?),
        }
    }

    fn write_zeroes(&self, offset: u64, len: u64, unmap: bool) -> Result<()> {
        check_range(self.size, offset, len)?;
        let res = if self.block_device {
            sys::blk_range_ioctl(&self.file, true, offset, len)
        } else {
            // A punched hole reads as zeroes, so `unmap` may free the space.
            let mode = if unmap { libc::FALLOC_FL_PUNCH_HOLE } else { libc::FALLOC_FL_ZERO_RANGE };
            sys::fallocate(&self.file, mode | libc::FALLOC_FL_KEEP_SIZE, offset, len)
        };
        match res {
            Err(e) if unsupported(&e) => self.write_zero_bytes(offset, len),
            r => Ok(r?),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn disk_with(content: &[u8]) -> (tempfile::NamedTempFile, RawDisk) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(f.path()).unwrap();
        (f, RawDisk::new(file, false).unwrap())
    }

    #[test]
    fn vectored_write_then_read_round_trips_across_buffers() {
        let (_f, disk) = disk_with(&[0u8; 8192]);
        let mut a = vec![1u8; 512];
        let mut b = vec![2u8; 1024];
        disk.write_vectored_at(&[Buf::from(&mut a[..]), Buf::from(&mut b[..])], 4096).unwrap();
        let mut out = vec![0u8; 2048];
        disk.read_vectored_at(&[Buf::from(&mut out[..])], 3584).unwrap();
        assert_eq!(&out[..512], &[0u8; 512][..]);
        assert_eq!(&out[512..1024], &[1u8; 512][..]);
        assert_eq!(&out[1024..], &[2u8; 1024][..]);
    }

    #[test]
    fn access_past_the_end_is_refused_and_writes_nothing() {
        let (f, disk) = disk_with(&[7u8; 4096]);
        let mut buf = vec![9u8; 1024];
        let err = disk.write_vectored_at(&[Buf::from(&mut buf[..])], 3584).unwrap_err();
        assert!(matches!(err, crate::disk::Error::OutOfRange { .. }), "{err}");
        assert!(disk.read_vectored_at(&[Buf::from(&mut buf[..])], u64::MAX - 10).is_err());
        assert_eq!(std::fs::read(f.path()).unwrap(), vec![7u8; 4096]);
    }

    #[test]
    fn write_zeroes_with_and_without_unmap_reads_back_zero() {
        let (f, disk) = disk_with(&[0xffu8; 16384]);
        disk.write_zeroes(4096, 4096, false).unwrap();
        disk.write_zeroes(12288, 2048, true).unwrap();
        let data = std::fs::read(f.path()).unwrap();
        assert_eq!(data.len(), 16384);
        assert!(data[4096..8192].iter().all(|&b| b == 0));
        assert!(data[12288..14336].iter().all(|&b| b == 0));
        assert!(data[..4096].iter().chain(&data[8192..12288]).chain(&data[14336..]).all(|&b| b == 0xff));
    }

    #[test]
    fn discard_keeps_size_and_neighbours() {
        let (f, disk) = disk_with(&[0x55u8; 16384]);
        disk.discard(4096, 4096).unwrap();
        let data = std::fs::read(f.path()).unwrap();
        assert_eq!(data.len(), 16384);
        assert!(data[..4096].iter().chain(&data[8192..]).all(|&b| b == 0x55));
    }
}
