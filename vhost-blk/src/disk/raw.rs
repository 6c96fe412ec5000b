//! Raw images: a regular file or a block device, read and written in place.

use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::FileTypeExt;

use io_uring::{opcode, types, IoUring};

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
    pub fn new(mut file: File) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        // Seeking to the end gives the size of regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(RawDisk { file, size, block_device })
    }

    fn transfer(&self, bufs: &[Buf<'_>], offset: u64, write: bool) -> Result<()> {
        check_range(self.size, offset, total_len(bufs))?;
        let mut iovs = iovecs(bufs);
        // SAFETY: each iovec covers exactly one `Buf`, mapped memory borrowed for this call.
        unsafe { sys::pv_all(&self.file, &mut iovs, offset, write) }?;
        Ok(())
    }

    /// Reads what the page cache holds at once; returns the bytes read, or `None` when the read
    /// would block.
    fn read_cached(&self, iovs: &[libc::iovec], offset: u64) -> Result<Option<usize>> {
        // SAFETY: the iovecs cover `Buf`s borrowed by our caller for the duration of the call.
        match unsafe { sys::preadv_nowait(&self.file, iovs, offset) } {
            Ok(0) => Ok(None),
            Ok(n) => Ok(Some(n)),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || unsupported(&e) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Runs reads that would block together on this thread's io_uring; one result each.
    fn read_blocked(&self, jobs: &mut [ReadJob]) -> Vec<Result<()>> {
        let done = RING.with(|cell| {
            let mut slot = cell.borrow_mut();
            let ring = slot.get_or_insert_with(|| IoUring::new(RING_ENTRIES).ok()).as_mut()?;
            let res = uring_readv(ring, self.file.as_raw_fd(), jobs);
            if let Err(e) = &res {
                tracing::warn!(error = %livesnap_proto::error::chain(e), "io_uring failed; reading the blocking way");
                // Completions may still be owed to a failed ring: never reuse it.
                *slot = None;
            }
            Some(res)
        });
        match done {
            Some(Ok(results)) => jobs
                .iter_mut()
                .zip(results)
                .map(|(job, res)| {
                    let n = res?;
                    if n == 0 {
                        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "The image ended early").into());
                    }
                    // A short read: finish it the blocking way.
                    let rest = sys::advance_iovecs(&mut job.iovs, n);
                    // SAFETY: as in `transfer`: the iovecs cover borrowed `Buf`s.
                    unsafe { sys::pv_all(&self.file, rest, job.offset + n as u64, false) }?;
                    Ok(())
                })
                .collect(),
            // No io_uring here, or it failed: one blocking read after the other.
            _ => jobs
                .iter_mut()
                .map(|job| {
                    // SAFETY: as in `transfer`: the iovecs cover borrowed `Buf`s.
                    unsafe { sys::pv_all(&self.file, &mut job.iovs, job.offset, false) }?;
                    Ok(())
                })
                .collect(),
        }
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

/// Entries of each queue thread's ring: the most reads that wait on the device at once.
const RING_ENTRIES: u32 = 256;

thread_local! {
    /// The io_uring of this queue thread, made on first use; `Some(None)` where the kernel has
    /// none to give.
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
}

/// Why a batch of reads could not go through the io_uring; the reads are then done the
/// blocking way, so this is only logged.
#[derive(Debug, thiserror::Error)]
enum RingError {
    #[error("The io_uring submission queue is full")]
    Full,
    #[error("Cannot wait for io_uring completions")]
    Wait(#[source] io::Error),
    #[error("The io_uring completed unknown read {0}")]
    UnknownCompletion(u64),
}

/// A read that could not be served from the page cache at once.
struct ReadJob {
    index: usize,
    offset: u64,
    iovs: Vec<libc::iovec>,
}

/// iovecs of guest buffers, for the syscalls. The pointers stay valid while `bufs` is borrowed
/// (a `Buf` has no dirty bitmap, so its guard has nothing to do when dropped).
fn iovecs(bufs: &[Buf<'_>]) -> Vec<libc::iovec> {
    bufs.iter().map(|b| libc::iovec { iov_base: b.ptr_guard_mut().as_ptr().cast(), iov_len: b.len() }).collect()
}

/// Submits `jobs` as readv operations, in rounds of at most the ring's size, and waits for all
/// of them; returns each one's byte count or error, in order.
fn uring_readv(
    ring: &mut IoUring,
    fd: RawFd,
    jobs: &[ReadJob],
) -> std::result::Result<Vec<io::Result<usize>>, RingError> {
    let mut results: Vec<io::Result<usize>> = Vec::with_capacity(jobs.len());
    results.resize_with(jobs.len(), || Ok(0));
    for (round, chunk) in jobs.chunks(RING_ENTRIES as usize).enumerate() {
        let base = round * RING_ENTRIES as usize;
        for (k, job) in chunk.iter().enumerate() {
            let entry = opcode::Readv::new(types::Fd(fd), job.iovs.as_ptr(), job.iovs.len() as u32)
                .offset(job.offset)
                .build()
                .user_data((base + k) as u64);
            // SAFETY: the iovec array and the guest buffers it points to outlive the operation:
            // this function waits for every completion before returning, and a failed ring is
            // dropped (which waits for or cancels what it has in flight) by the caller.
            unsafe { ring.submission().push(&entry) }.map_err(|_| RingError::Full)?;
        }
        let mut left = chunk.len();
        while left > 0 {
            match ring.submit_and_wait(left) {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(RingError::Wait(e)),
            }
            for cqe in ring.completion() {
                let data = cqe.user_data();
                let i = usize::try_from(data).ok().filter(|&i| i >= base && i < base + chunk.len());
                let i = i.ok_or(RingError::UnknownCompletion(data))?;
                let res = cqe.result();
                results[i] = if res < 0 { Err(io::Error::from_raw_os_error(-res)) } else { Ok(res as usize) };
                left -= 1;
            }
        }
    }
    Ok(results)
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

    /// Serves from the page cache what it holds, without blocking; the reads that would wait
    /// for the device go to the device together, so that they overlap.
    fn read_batch(&self, reads: &[(u64, &[Buf<'_>])]) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(reads.len());
        let mut blocked = Vec::new();
        for (index, &(offset, bufs)) in reads.iter().enumerate() {
            let len = total_len(bufs);
            let res = check_range(self.size, offset, len).and_then(|()| {
                let mut iovs = iovecs(bufs);
                let n = self.read_cached(&iovs, offset)?.unwrap_or(0);
                if (n as u64) < len {
                    let rest = sys::advance_iovecs(&mut iovs, n).to_vec();
                    blocked.push(ReadJob { index, offset: offset + n as u64, iovs: rest });
                }
                Ok(())
            });
            results.push(res);
        }
        if !blocked.is_empty() {
            for (job, res) in
                blocked.iter().map(|j| j.index).collect::<Vec<_>>().into_iter().zip(self.read_blocked(&mut blocked))
            {
                results[job] = res;
            }
        }
        results
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
    use std::os::fd::AsRawFd;

    fn disk_with(content: &[u8]) -> (tempfile::NamedTempFile, RawDisk) {
        let mut f = tempfile::NamedTempFile::new().unwrap();
        f.write_all(content).unwrap();
        let file = std::fs::OpenOptions::new().read(true).write(true).open(f.path()).unwrap();
        (f, RawDisk::new(file).unwrap())
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

    /// Drops the file's pages from the page cache, so that reads have to wait for the device.
    fn drop_cache(f: &tempfile::NamedTempFile) {
        let file = f.as_file();
        file.sync_all().unwrap();
        // SAFETY: posix_fadvise(2) on a descriptor we own; no memory is passed.
        assert_eq!(unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) }, 0);
    }

    #[test]
    fn batched_reads_of_uncached_data_return_the_right_bytes() {
        let content: Vec<u8> = (0..4u32 << 20).map(|i| (i / 4096 + i % 253) as u8).collect();
        let (f, disk) = disk_with(&content);
        for round in 0..2 {
            drop_cache(&f);
            // 40 reads, some split over two buffers, one of them past the end.
            let mut bufs: Vec<Vec<u8>> = (0..40).map(|i| vec![0u8; 4096 * (1 + i % 3)]).collect();
            let offsets: Vec<u64> = (0..40u64).map(|i| (i * 7919 + round) % 1000 * 4096).collect();
            let slices: Vec<Vec<Buf<'_>>> = bufs
                .iter_mut()
                .map(|b| {
                    let (lo, hi) = b.split_at_mut(2048);
                    vec![Buf::from(lo), Buf::from(hi)]
                })
                .collect();
            let mut reads: Vec<(u64, &[Buf<'_>])> = offsets.iter().zip(&slices).map(|(&o, s)| (o, &s[..])).collect();
            reads[17].0 = (4 << 20) - 4096;
            let results = disk.read_batch(&reads);
            drop(slices);
            for (i, (res, buf)) in results.iter().zip(&bufs).enumerate() {
                if i == 17 && buf.len() > 4096 {
                    assert!(res.is_err(), "read past the end succeeded");
                    continue;
                }
                res.as_ref().unwrap();
                let at = if i == 17 { (4 << 20) - 4096 } else { offsets[i] as usize };
                assert!(buf[..] == content[at..at + buf.len()], "read {i} at {at}");
            }
        }
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
