//! Raw images: a regular file or a block device, read and written in place.
//!
//! Two cache modes (QEMU's names, [`Cache`]). `writeback`: through the host's page cache; reads
//! the page cache holds are served at once with `preadv2(RWF_NOWAIT)`, the others go to the
//! device together through the queue thread's io_uring. `none`: a second descriptor opened
//! `O_DIRECT`, every read and write through the io_uring; a guest buffer that direct I/O cannot
//! take (its address or a segment's length not aligned as `statx(STATX_DIOALIGN)` says) is
//! copied through an aligned bounce buffer, and a request whose offset or length is not aligned
//! (never one from virtio, whose sectors are 512 bytes, unless the file wants more) goes
//! through the buffered descriptor, which the kernel keeps coherent with direct I/O. In both
//! modes the writes a queue takes at once are submitted together ([`DiskFile::write_batch`]).

use std::alloc::{self, Layout};
use std::cell::RefCell;
use std::fs::File;
use std::io::{self, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileTypeExt;
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use io_uring::IoUring;

use super::uring;
use super::{check_range, total_len, Buf, Cache, DiskFile, Format, Result};
use crate::sys;

/// Largest piece written at once when zeroes have to be written out by hand.
const ZERO_CHUNK: u64 = 1 << 20;
/// Most iovecs one readv/writev takes (IOV_MAX); longer requests go the blocking way, which
/// splits them.
const IOV_MAX: usize = 1024;
/// Direct-I/O alignment assumed when `statx` does not say: a page, safe on every device.
const FALLBACK_DIO_ALIGN: u32 = 4096;

#[derive(Debug)]
pub struct RawDisk {
    /// The buffered descriptor: all I/O with `cache=writeback`; with `cache=none` syncs,
    /// discards and what direct I/O cannot take.
    file: File,
    /// With `cache=none`: the `O_DIRECT` descriptor and its alignment.
    direct: Option<Direct>,
    size: u64,
    block_device: bool,
    /// Requests done with direct I/O, and those of them bounced.
    direct_requests: AtomicU64,
    bounced: AtomicU64,
}

#[derive(Debug)]
struct Direct {
    file: File,
    /// Alignment of memory addresses (a power of two).
    mem_align: usize,
    /// Alignment of file offsets and of every segment's length (a power of two).
    block: u64,
}

impl RawDisk {
    /// A raw image served through the page cache (`cache=writeback`).
    pub fn new(file: File) -> io::Result<Self> {
        Self::with_direct(file, None)
    }

    /// A raw image with `cache`: for [`Cache::None`], `direct` is the same image opened again
    /// with `O_DIRECT`.
    pub fn with_cache(file: File, cache: Cache, direct: Option<File>) -> io::Result<Self> {
        match (cache, direct) {
            (Cache::Writeback, _) => Self::new(file),
            (Cache::None, Some(d)) => Self::with_direct(file, Some(d)),
            (Cache::None, None) => {
                Err(io::Error::new(io::ErrorKind::InvalidInput, "cache=none needs a descriptor opened with O_DIRECT"))
            }
        }
    }

    fn with_direct(mut file: File, direct: Option<File>) -> io::Result<Self> {
        let block_device = file.metadata()?.file_type().is_block_device();
        // Seeking to the end gives the size of regular files and block devices alike.
        let size = file.seek(SeekFrom::End(0))?;
        let direct = match direct {
            None => None,
            Some(d) => {
                let (mem, off) = sys::dio_alignment(&d)?.unwrap_or((FALLBACK_DIO_ALIGN, FALLBACK_DIO_ALIGN));
                if !mem.is_power_of_two() || !off.is_power_of_two() {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!("direct I/O alignment {mem}/{off} is not a power of two"),
                    ));
                }
                tracing::debug!(mem_align = mem, offset_align = off, "image opened for direct I/O");
                Some(Direct { file: d, mem_align: mem as usize, block: u64::from(off) })
            }
        };
        Ok(RawDisk { file, direct, size, block_device, direct_requests: AtomicU64::new(0), bounced: AtomicU64::new(0) })
    }

    /// The cache mode the image is served with.
    pub fn cache(&self) -> Cache {
        if self.direct.is_some() {
            Cache::None
        } else {
            Cache::Writeback
        }
    }

    /// Requests done with direct I/O so far, and how many of them went through a bounce buffer.
    pub fn bounce_stats(&self) -> (u64, u64) {
        (self.direct_requests.load(Ordering::Relaxed), self.bounced.load(Ordering::Relaxed))
    }

    /// Prepares one request for the ring: checks its range, and with `cache=none` bounces a
    /// buffer direct I/O cannot take. A request with nothing left for the ring (empty, or done
    /// the buffered way because its offset is not aligned) gives `None`.
    fn job(&self, index: usize, offset: u64, bufs: &[Buf<'_>], write: bool) -> Result<Option<Job>> {
        let len = total_len(bufs);
        check_range(self.size, offset, len)?;
        if len == 0 {
            return Ok(None);
        }
        let Some(d) = &self.direct else {
            return Ok(Some(Job { index, offset, iovs: iovecs(bufs), bounce: None, direct: false }));
        };
        if offset % d.block != 0 || len % d.block != 0 {
            let mut iovs = iovecs(bufs);
            // SAFETY: the iovecs cover `Buf`s borrowed by our caller for the duration of the call.
            unsafe { sys::pv_all(&self.file, &mut iovs, offset, write) }?;
            return Ok(None);
        }
        let n = self.direct_requests.fetch_add(1, Ordering::Relaxed) + 1;
        let aligned = bufs
            .iter()
            .all(|b| (b.ptr_guard().as_ptr() as usize) % d.mem_align == 0 && (b.len() as u64) % d.block == 0);
        if aligned && bufs.len() <= IOV_MAX {
            return Ok(Some(Job { index, offset, iovs: iovecs(bufs), bounce: None, direct: true }));
        }
        let bounced = self.bounced.fetch_add(1, Ordering::Relaxed) + 1;
        if bounced.is_power_of_two() {
            tracing::info!(
                bounced,
                of = n,
                "cache=none: guest buffers not aligned for direct I/O go through a bounce buffer"
            );
        }
        let mut bounce = AlignedBuf::new(len as usize, d.mem_align.max(d.block as usize))?;
        if write {
            let mut at = 0;
            for b in bufs {
                b.copy_to(&mut bounce.as_mut_slice()[at..at + b.len()]);
                at += b.len();
            }
        }
        Ok(Some(Job { index, offset, iovs: vec![bounce.iovec()], bounce: Some(bounce), direct: true }))
    }

    /// The descriptor a job's I/O goes to.
    fn fd_of(&self, job: &Job) -> &File {
        match (&self.direct, job.direct) {
            (Some(d), true) => &d.file,
            _ => &self.file,
        }
    }

    /// Runs `jobs` together on this thread's io_uring (one after the other, blocking, where
    /// there is none); returns each one's outcome, short transfers finished.
    fn run_jobs(&self, jobs: &mut [Job], write: bool) -> Vec<Result<()>> {
        let done = RING.with(|cell| {
            let mut slot = cell.borrow_mut();
            let ring = slot.get_or_insert_with(|| IoUring::new(uring::ENTRIES).ok()).as_mut()?;
            let ops: Vec<uring::Op<'_>> =
                jobs.iter().map(|j| uring::Op { fd: self.fd_of(j).as_raw_fd(), iovs: &j.iovs, offset: j.offset }).collect();
            let res = uring::run(ring, &ops, write);
            if let Err(e) = &res {
                tracing::warn!(error = %livesnap_proto::error::chain(e), "io_uring failed; doing the I/O the blocking way");
                // Nothing is in flight (`run` waited for it), but a ring that failed once is
                // not trusted again.
                *slot = None;
            }
            Some(res)
        });
        match done {
            Some(Ok(results)) => jobs.iter_mut().zip(results).map(|(job, res)| self.finish(job, res, write)).collect(),
            // No io_uring here, or it failed: one blocking transfer after the other.
            _ => jobs
                .iter_mut()
                .map(|job| {
                    // SAFETY: the iovecs cover `Buf`s borrowed by our caller, or the job's own
                    // bounce buffer.
                    unsafe { sys::pv_all(self.fd_of(job), &mut job.iovs, job.offset, write) }?;
                    Ok(())
                })
                .collect(),
        }
    }

    /// Finishes a job the ring transferred `res` bytes of: a short transfer is completed the
    /// blocking way (through the buffered descriptor, which takes any alignment).
    fn finish(&self, job: &mut Job, res: io::Result<usize>, write: bool) -> Result<()> {
        let n = res?;
        if n == 0 {
            let kind = if write { io::ErrorKind::WriteZero } else { io::ErrorKind::UnexpectedEof };
            return Err(io::Error::new(kind, "The image ended early").into());
        }
        let rest = sys::advance_iovecs(&mut job.iovs, n);
        if !rest.is_empty() {
            // SAFETY: as in `run_jobs`: the iovecs cover borrowed `Buf`s or the bounce buffer.
            unsafe { sys::pv_all(&self.file, rest, job.offset + n as u64, write) }?;
        }
        Ok(())
    }

    /// Runs independent transfers, reads or writes, together; one result each, in order.
    fn batch(&self, reqs: &[(u64, &[Buf<'_>])], write: bool) -> Vec<Result<()>> {
        let mut results: Vec<Result<()>> = Vec::with_capacity(reqs.len());
        let mut jobs = Vec::new();
        for (index, &(offset, bufs)) in reqs.iter().enumerate() {
            let res = self.job(index, offset, bufs, write).and_then(|job| {
                let Some(mut job) = job else { return Ok(()) };
                if !write && !job.direct {
                    // Buffered: what the page cache holds is read at once.
                    let len = total_len(bufs);
                    let n = self.read_cached(&job.iovs, offset)?.unwrap_or(0);
                    if n as u64 == len {
                        return Ok(());
                    }
                    let rest = sys::advance_iovecs(&mut job.iovs, n).to_vec();
                    job = Job { offset: offset + n as u64, iovs: rest, ..job };
                }
                if job.iovs.len() > IOV_MAX {
                    // SAFETY: the iovecs cover `Buf`s borrowed by our caller.
                    unsafe { sys::pv_all(self.fd_of(&job), &mut job.iovs, job.offset, write) }?;
                    return Ok(());
                }
                jobs.push(job);
                Ok(())
            });
            results.push(res);
        }
        if !jobs.is_empty() {
            let outcomes = self.run_jobs(&mut jobs, write);
            for (job, res) in jobs.iter().zip(outcomes) {
                let (index, bufs) = (job.index, reqs[job.index].1);
                results[index] = res.map(|()| {
                    if let (false, Some(bounce)) = (write, &job.bounce) {
                        let mut at = 0;
                        for b in bufs {
                            b.copy_from(&bounce.as_slice()[at..at + b.len()]);
                            at += b.len();
                        }
                    }
                });
            }
        }
        results
    }

    /// One transfer, the blocking way.
    fn transfer(&self, bufs: &[Buf<'_>], offset: u64, write: bool) -> Result<()> {
        let Some(mut job) = self.job(0, offset, bufs, write)? else { return Ok(()) };
        // SAFETY: the iovecs cover `Buf`s borrowed for this call, or the job's bounce buffer.
        unsafe { sys::pv_all(self.fd_of(&job), &mut job.iovs, offset, write) }?;
        if let (false, Some(bounce)) = (write, &job.bounce) {
            let mut at = 0;
            for b in bufs {
                b.copy_from(&bounce.as_slice()[at..at + b.len()]);
                at += b.len();
            }
        }
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

thread_local! {
    /// The io_uring of this queue thread, made on first use; `Some(None)` where the kernel has
    /// none to give.
    static RING: RefCell<Option<Option<IoUring>>> = const { RefCell::new(None) };
}

/// A transfer for the ring.
struct Job {
    /// Its request's place in the batch.
    index: usize,
    offset: u64,
    /// Guest buffers, or the one bounce buffer.
    iovs: Vec<libc::iovec>,
    bounce: Option<AlignedBuf>,
    /// Goes through the `O_DIRECT` descriptor.
    direct: bool,
}

/// Heap memory aligned for direct I/O, zeroed.
struct AlignedBuf {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl AlignedBuf {
    fn new(len: usize, align: usize) -> io::Result<Self> {
        let layout = Layout::from_size_align(len.max(1), align)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "bad bounce buffer layout"))?;
        // SAFETY: the layout's size is not zero.
        let ptr = NonNull::new(unsafe { alloc::alloc_zeroed(layout) })
            .ok_or_else(|| io::Error::new(io::ErrorKind::OutOfMemory, "cannot allocate a bounce buffer"))?;
        Ok(AlignedBuf { ptr, layout })
    }

    fn as_slice(&self) -> &[u8] {
        // SAFETY: `ptr` points to `layout.size()` initialised (zeroed) bytes that we own.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in `as_slice`, and `&mut self` makes this the only reference.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.layout.size()) }
    }

    fn iovec(&mut self) -> libc::iovec {
        libc::iovec { iov_base: self.ptr.as_ptr().cast(), iov_len: self.layout.size() }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this very layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// iovecs of guest buffers, for the syscalls. The pointers stay valid while `bufs` is borrowed
/// (a `Buf` has no dirty bitmap, so its guard has nothing to do when dropped).
fn iovecs(bufs: &[Buf<'_>]) -> Vec<libc::iovec> {
    bufs.iter().map(|b| libc::iovec { iov_base: b.ptr_guard_mut().as_ptr().cast(), iov_len: b.len() }).collect()
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

    /// Buffered: serves from the page cache what it holds, without blocking; the reads that
    /// would wait for the device go to it together, so that they overlap. Direct: all of them
    /// go to the device together.
    fn read_batch(&self, reads: &[(u64, &[Buf<'_>])]) -> Vec<Result<()>> {
        self.batch(reads, false)
    }

    fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> Result<()> {
        self.transfer(bufs, offset, true)
    }

    /// All of them go to the ring together; each one has completed when this returns.
    fn write_batch(&self, writes: &[(u64, &[Buf<'_>])]) -> Vec<Result<()>> {
        self.batch(writes, true)
    }

    fn flush(&self) -> Result<()> {
        // One inode: the buffered descriptor's fdatasync also covers what direct I/O wrote
        // (the device's cache is flushed).
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
        for (round, cache) in [(0, Cache::Writeback), (1, Cache::Writeback), (0, Cache::None), (1, Cache::None)] {
            let (f, disk) = disk_with_cache(&content, cache);
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

    /// A disk holding `content`, in a file under /var/tmp (O_DIRECT needs a disk-backed
    /// filesystem), served with `cache`.
    fn disk_with_cache(content: &[u8], cache: Cache) -> (tempfile::NamedTempFile, RawDisk) {
        let mut f = tempfile::NamedTempFile::new_in("/var/tmp").unwrap();
        f.write_all(content).unwrap();
        f.as_file().sync_all().unwrap();
        let open = |direct: bool| {
            let mut o = std::fs::OpenOptions::new();
            o.read(true).write(true);
            if direct {
                std::os::unix::fs::OpenOptionsExt::custom_flags(&mut o, libc::O_DIRECT);
            }
            o.open(f.path()).unwrap()
        };
        let direct = (cache == Cache::None).then(|| open(true));
        let disk = RawDisk::with_cache(open(false), cache, direct).unwrap();
        assert_eq!(disk.cache(), cache);
        (f, disk)
    }

    /// `len` bytes of memory that start `skew` bytes past a page boundary.
    struct Skewed {
        mem: AlignedBuf,
        skew: usize,
        len: usize,
    }

    impl Skewed {
        fn new(len: usize, skew: usize, fill: u8) -> Self {
            let mut mem = AlignedBuf::new(len + skew, 4096).unwrap();
            mem.as_mut_slice().fill(fill);
            Skewed { mem, skew, len }
        }
        fn buf(&mut self) -> Buf<'_> {
            let (skew, len) = (self.skew, self.len);
            Buf::from(&mut self.mem.as_mut_slice()[skew..skew + len])
        }
        fn bytes(&self) -> &[u8] {
            &self.mem.as_slice()[self.skew..self.skew + self.len]
        }
    }

    #[test]
    fn batched_writes_land_where_asked_and_a_bad_one_fails_alone() {
        for cache in [Cache::Writeback, Cache::None] {
            let (f, disk) = disk_with_cache(&vec![0u8; 2 << 20], cache);
            // 24 writes of 4 to 64 KiB, page-aligned or not, one or two buffers each, and one
            // past the end; none overlaps another.
            let mut mems: Vec<(Skewed, Skewed)> = (0..24)
                .map(|i| {
                    let len = 4096 * (1 + i % 16);
                    let skew = if i % 3 == 0 { 8 * i } else { 0 };
                    (Skewed::new(len / 2, skew, 1 + i as u8), Skewed::new(len / 2, 0, 101 + i as u8))
                })
                .collect();
            let offsets: Vec<u64> = (0..24u64).map(|i| i * 65536).collect();
            let bufs: Vec<Vec<Buf<'_>>> = mems.iter_mut().map(|(a, b)| vec![a.buf(), b.buf()]).collect();
            let mut writes: Vec<(u64, &[Buf<'_>])> = offsets.iter().zip(&bufs).map(|(&o, b)| (o, &b[..])).collect();
            writes[5].0 = (2 << 20) - 4096;
            let results = disk.write_batch(&writes);
            drop(bufs);
            let data = std::fs::read(f.path()).unwrap();
            for (i, res) in results.iter().enumerate() {
                let (a, b) = &mems[i];
                if i == 5 {
                    assert!(res.is_err(), "{cache}: a write past the end succeeded");
                    assert!(data[(2 << 20) - 4096..].iter().all(|&x| x == 0), "{cache}: it wrote something");
                    continue;
                }
                res.as_ref().unwrap();
                let at = offsets[i] as usize;
                assert!(data[at..at + a.len] == *a.bytes(), "{cache}: write {i}, first buffer");
                assert!(data[at + a.len..at + a.len + b.len] == *b.bytes(), "{cache}: write {i}, second buffer");
            }
            disk.flush().unwrap();
        }
    }

    #[test]
    fn cache_none_bounces_only_unaligned_buffers_and_reads_back_every_byte() {
        let content: Vec<u8> = (0..1u32 << 20).map(|i| (i % 251) as u8).collect();
        let (f, disk) = disk_with_cache(&content, Cache::None);
        // Page-aligned memory of whole pages: straight to the device.
        let mut aligned = Skewed::new(8192, 0, 0);
        disk.read_vectored_at(&[aligned.buf()], 4096).unwrap();
        assert_eq!(aligned.bytes(), &content[4096..12288]);
        assert_eq!(disk.bounce_stats(), (1, 0));
        // Memory off a page boundary, and a 512-byte segment: bounced, read and written.
        let (mut odd, mut small) = (Skewed::new(3584, 1, 0), Skewed::new(512, 0, 0));
        let results = disk.read_batch(&[(65536, &[odd.buf(), small.buf()][..])]);
        results.into_iter().for_each(|r| r.unwrap());
        assert_eq!(odd.bytes(), &content[65536..69120]);
        assert_eq!(small.bytes(), &content[69120..69632]);
        let mut w = Skewed::new(4096, 3, 0xab);
        disk.write_vectored_at(&[w.buf()], 8192).unwrap();
        let (direct, bounced) = disk.bounce_stats();
        assert_eq!((direct, bounced), (3, 2));
        // A request off the file's direct-I/O alignment goes the buffered way, coherently.
        let mut tiny = [0xcdu8; 100];
        disk.write_vectored_at(&[Buf::from(&mut tiny[..])], 3).unwrap();
        assert_eq!(disk.bounce_stats(), (3, 2));
        let mut back = Skewed::new(16384, 0, 0);
        disk.read_vectored_at(&[back.buf()], 0).unwrap();
        let mut want = content[..16384].to_vec();
        want[3..103].fill(0xcd);
        want[8192..12288].fill(0xab);
        assert!(back.bytes() == &want[..], "a direct read sees the buffered and the direct writes");
        disk.flush().unwrap();
        assert!(std::fs::read(f.path()).unwrap()[..16384] == want[..], "a buffered reader sees them too");
    }
}
