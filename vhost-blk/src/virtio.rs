//! virtio-blk requests: parsing a descriptor chain (any framing, as VERSION_1 requires) and
//! executing it on a [`DiskFile`].
//!
//! Everything here treats the chain as hostile: addresses outside guest memory, readable
//! descriptors after writable ones, missing or read-only status bytes, lengths that are not
//! whole sectors, ranges past the end of the disk. Each gets a virtio status through
//! [`Error::status`], or no completion length at all when there is nowhere to write a status.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use thiserror::Error;
use tracing::debug;
use virtio_bindings::virtio_blk::*;
use virtio_queue::desc::split::Descriptor;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::disk::{self, check_range, total_len, Buf, DiskFile, SECTOR_SIZE};

/// Size of the request header: type, reserved, sector.
const HEADER_LEN: usize = 16;
/// Size of one discard / write-zeroes segment: sector, num_sectors, flags.
const SEGMENT_LEN: usize = 16;
/// Bytes of the GET_ID answer.
const ID_BYTES: usize = VIRTIO_BLK_ID_BYTES as usize;
/// Largest data transfer accepted in one request: bounds the bounce buffers of qcow2.
pub const MAX_REQUEST_BYTES: u64 = 64 << 20;
/// Limits advertised in the config space and enforced here.
pub const MAX_DISCARD_SEGMENTS: u32 = 16;
pub const MAX_DISCARD_SECTORS: u32 = (1 << 30) / SECTOR_SIZE as u32;

#[derive(Debug, Error)]
pub enum Error {
    #[error("Descriptor points outside guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
    #[error("Device-readable descriptor follows a device-writable one")]
    ReadableAfterWritable,
    #[error("Request has no device-writable status byte")]
    NoStatus,
    #[error("Request header is shorter than {HEADER_LEN} bytes")]
    ShortHeader,
    #[error("Request carries more than {MAX_REQUEST_BYTES} bytes")]
    TooLarge,
    #[error("Data length {0} is not a whole number of sectors")]
    UnalignedLength(u64),
    #[error("Sector {0} is out of range")]
    SectorOutOfRange(u64),
    #[error("Request type {0} is not supported")]
    UnsupportedType(u32),
    #[error("Segment flags {0:#x} are not supported")]
    UnsupportedFlags(u32),
    #[error("Write to a read-only disk")]
    ReadOnly,
    #[error("Malformed discard or write-zeroes segment list of {0} bytes")]
    BadSegments(u64),
    #[error("Disk I/O failed")]
    Disk(#[source] disk::Error),
    #[error("Cannot make the write durable (write-through mode)")]
    FlushFailed(#[source] Arc<disk::Error>),
}

impl Error {
    /// The virtio status the guest sees for this error.
    pub fn status(&self) -> u8 {
        match self {
            Error::UnsupportedType(_) | Error::UnsupportedFlags(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }
}

impl From<disk::Error> for Error {
    fn from(e: disk::Error) -> Self {
        match e {
            disk::Error::OutOfRange { offset, .. } => Error::SectorOutOfRange(offset / SECTOR_SIZE),
            e => Error::Disk(e),
        }
    }
}

/// The request types livesnap-blk knows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RequestType {
    In,
    Out,
    Flush,
    GetId,
    Discard,
    WriteZeroes,
    Other(u32),
}

impl From<u32> for RequestType {
    fn from(t: u32) -> Self {
        match t {
            VIRTIO_BLK_T_IN => RequestType::In,
            VIRTIO_BLK_T_OUT => RequestType::Out,
            VIRTIO_BLK_T_FLUSH => RequestType::Flush,
            VIRTIO_BLK_T_GET_ID => RequestType::GetId,
            VIRTIO_BLK_T_DISCARD => RequestType::Discard,
            VIRTIO_BLK_T_WRITE_ZEROES => RequestType::WriteZeroes,
            t => RequestType::Other(t),
        }
    }
}

/// A request, its buffers resolved to guest memory.
#[derive(Debug)]
pub struct Request<'a> {
    pub kind: RequestType,
    pub sector: u64,
    /// Device-readable bytes after the header: data of OUT, segments of DISCARD/WRITE_ZEROES.
    pub readable: Vec<Buf<'a>>,
    /// Device-writable bytes before the status byte: data of IN, the answer of GET_ID.
    pub writable: Vec<Buf<'a>>,
    pub status: Buf<'a>,
}

/// A chain that could not be parsed, and where to report it if anywhere.
#[derive(Debug)]
pub struct ParseError<'a> {
    pub error: Error,
    pub status: Option<Buf<'a>>,
}

/// Resolves a descriptor chain against guest memory.
///
/// The status byte (the last byte of the chain, which must be device-writable) is found first,
/// so that every later fault can be reported in it.
pub fn parse<'a>(
    descs: impl Iterator<Item = Descriptor>,
    mem: &'a GuestMemoryMmap,
) -> Result<Request<'a>, ParseError<'a>> {
    let fail = |error| ParseError { error, status: None };
    // The chain iterator stops after queue-size descriptors, so this is bounded.
    let mut descs: Vec<(u64, u64, bool)> = descs.map(|d| (d.addr().0, u64::from(d.len()), d.is_write_only())).collect();
    let (addr, len, write) = descs.pop().ok_or(fail(Error::NoStatus))?;
    if !write || len == 0 {
        return Err(fail(Error::NoStatus));
    }
    let status_addr = addr.checked_add(len - 1).ok_or(fail(Error::NoStatus))?;
    let status = mem.get_slice(GuestAddress(status_addr), 1).map_err(|e| fail(Error::GuestMemory(e)))?;
    if len > 1 {
        descs.push((addr, len - 1, true));
    }
    let fail = |error| ParseError { error, status: Some(status) };

    let total: u64 = descs.iter().map(|d| d.1).sum();
    if total > MAX_REQUEST_BYTES + HEADER_LEN as u64 {
        return Err(fail(Error::TooLarge));
    }
    let mut header = [0u8; HEADER_LEN];
    let mut header_missing = HEADER_LEN;
    let mut readable = Vec::new();
    let mut writable: Vec<Buf<'a>> = Vec::new();
    for (addr, len, write) in descs {
        if !write && !writable.is_empty() {
            return Err(fail(Error::ReadableAfterWritable));
        }
        for slice in mem.get_slices(GuestAddress(addr), len as usize) {
            let slice = slice.map_err(|e| fail(Error::GuestMemory(e)))?;
            if write {
                writable.push(slice);
            } else if header_missing > 0 {
                let take = header_missing.min(slice.len());
                let at = HEADER_LEN - header_missing;
                // Both ranges are in bounds: take <= slice.len() and at + take <= HEADER_LEN.
                slice.copy_to(&mut header[at..at + take]);
                header_missing -= take;
                if take < slice.len() {
                    readable.push(slice.offset(take).map_err(|e| fail(Error::GuestMemory(e.into())))?);
                }
            } else {
                readable.push(slice);
            }
        }
    }
    if header_missing > 0 {
        return Err(fail(Error::ShortHeader));
    }
    let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
    let mut sector = [0u8; 8];
    sector.copy_from_slice(&header[8..16]);
    Ok(Request { kind: le32(&header[0..4]).into(), sector: u64::from_le_bytes(sector), readable, writable, status })
}

/// One virtio-blk disk as the guest sees it.
#[derive(Debug)]
pub struct BlkDevice {
    pub disk: Arc<dyn DiskFile>,
    /// Answer of GET_ID: the disk's id, the guest's serial number.
    pub serial: String,
    pub readonly: bool,
    /// Write-back cache on (the default, and what a driver that negotiated FLUSH starts with);
    /// off (no FLUSH negotiated, or the driver chose write-through), every write, zeroing and
    /// discard is flushed before it completes.
    writeback: AtomicBool,
    /// Write-through was imposed by a driver without FLUSH, not chosen through CONFIG_WCE.
    forced_write_through: AtomicBool,
}

impl BlkDevice {
    pub fn new(disk: Arc<dyn DiskFile>, serial: String, readonly: bool) -> Self {
        BlkDevice {
            disk,
            serial,
            readonly,
            writeback: AtomicBool::new(true),
            forced_write_through: AtomicBool::new(false),
        }
    }

    pub fn writeback(&self) -> bool {
        self.writeback.load(Ordering::Relaxed)
    }

    /// The driver's choice through CONFIG_WCE.
    pub fn set_writeback(&self, on: bool) {
        self.forced_write_through.store(false, Ordering::Relaxed);
        self.writeback.store(on, Ordering::Relaxed);
    }

    /// Features were negotiated. A driver without FLUSH assumes there is no write-back cache
    /// (virtio 1.2 §5.2.6.2; Linux then never flushes), so every write must be durable before
    /// it completes. A driver with FLUSH keeps the mode it chose, if it chose one: frontends
    /// negotiate again after a VM pause or a reconnect, with no reset of the guest's driver;
    /// one that follows a forced write-through gets write-back back.
    pub fn negotiated(&self, flush: bool) {
        if !flush {
            self.forced_write_through.store(true, Ordering::Relaxed);
            self.writeback.store(false, Ordering::Relaxed);
        } else if self.forced_write_through.swap(false, Ordering::Relaxed) {
            self.writeback.store(true, Ordering::Relaxed);
        }
    }

    /// Capacity in sectors.
    pub fn capacity(&self) -> u64 {
        self.disk.size() / SECTOR_SIZE
    }

    /// Parses and runs one chain; returns the used length to report (bytes written to guest
    /// memory, the status byte included), 0 when there was nowhere to write a status.
    pub fn process(&self, descs: impl Iterator<Item = Descriptor>, mem: &GuestMemoryMmap) -> u32 {
        self.process_batch(std::iter::once(descs), mem)[0]
    }

    /// Parses and runs the chains taken from a queue in one go; returns each one's used length,
    /// in order. The driver ordered none of them against each other: it submitted them all
    /// before any completed. Writes go to the disk together first ([`DiskFile::write_batch`]),
    /// then the other requests one after the other, then the reads together
    /// ([`DiskFile::read_batch`]), so that those the page cache cannot serve wait for the device
    /// at the same time.
    ///
    /// FLUSH: it must cover every write the guest saw complete before submitting it. Those were
    /// all completed by an earlier call (on this queue or another), and a write is put in the
    /// used ring only after the disk returned it, so the flush covers them wherever it runs in
    /// this batch; running it after the batch's own writes covers those too, at no extra cost.
    /// In write-through mode one flush after the writes makes all of them durable before any
    /// completes; if it fails, they all fail.
    pub fn process_batch<I: Iterator<Item = Descriptor>>(
        &self,
        chains: impl Iterator<Item = I>,
        mem: &GuestMemoryMmap,
    ) -> Vec<u32> {
        let mut outcomes: Vec<(Option<Buf<'_>>, Result<u32, Error>)> = Vec::new();
        let mut reads = Vec::new();
        let mut writes = Vec::new();
        let mut others = Vec::new();
        for (i, parsed) in chains.map(|c| parse(c, mem)).enumerate() {
            outcomes.push(match parsed {
                Ok(req) if req.kind == RequestType::In => match self.data_offset(req.sector, &req.writable) {
                    Ok(offset) => {
                        let len = total_len(&req.writable) as u32;
                        reads.push((i, offset, req.writable));
                        (Some(req.status), Ok(len))
                    }
                    Err(e) => (Some(req.status), Err(e)),
                },
                Ok(req) if req.kind == RequestType::Out => {
                    match self.check_writable().and_then(|()| self.data_offset(req.sector, &req.readable)) {
                        Ok(offset) => {
                            writes.push((i, offset, req.readable));
                            (Some(req.status), Ok(0))
                        }
                        Err(e) => (Some(req.status), Err(e)),
                    }
                }
                Ok(req) => {
                    let status = req.status;
                    others.push((i, req));
                    (Some(status), Ok(0))
                }
                Err(ParseError { error, status }) => (status, Err(error)),
            });
        }
        if !writes.is_empty() {
            let batch: Vec<(u64, &[Buf<'_>])> = writes.iter().map(|(_, offset, bufs)| (*offset, &bufs[..])).collect();
            let results = self.disk.write_batch(&batch);
            let flushed = if !self.writeback() && results.iter().any(Result::is_ok) {
                self.disk.flush().map_err(Arc::new)
            } else {
                Ok(())
            };
            for ((i, ..), res) in writes.iter().zip(results) {
                outcomes[*i].1 = match (res, &flushed) {
                    (Err(e), _) => Err(e.into()),
                    (Ok(()), Err(e)) => Err(Error::FlushFailed(e.clone())),
                    (Ok(()), Ok(())) => Ok(0),
                };
            }
        }
        for (i, req) in others {
            outcomes[i].1 = self.execute(&req);
        }
        if !reads.is_empty() {
            let batch: Vec<(u64, &[Buf<'_>])> = reads.iter().map(|(_, offset, bufs)| (*offset, &bufs[..])).collect();
            for ((i, ..), res) in reads.iter().zip(self.disk.read_batch(&batch)) {
                if let Err(e) = res {
                    outcomes[*i].1 = Err(e.into());
                }
            }
        }
        outcomes
            .into_iter()
            .map(|(status, result)| {
                let Some(status) = status else {
                    if let Err(error) = &result {
                        debug!(%error, "dropping a request with no status byte");
                    }
                    return 0;
                };
                let (code, written) = match result {
                    Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
                    Err(error) => {
                        debug!(%error, "request failed");
                        (error.status(), 0)
                    }
                };
                status.copy_from(&[code]);
                written + 1
            })
            .collect()
    }

    /// Runs a request; returns the bytes written into its writable buffers.
    pub fn execute(&self, req: &Request<'_>) -> Result<u32, Error> {
        match req.kind {
            RequestType::In => {
                let offset = self.data_offset(req.sector, &req.writable)?;
                self.disk.read_vectored_at(&req.writable, offset)?;
                Ok(total_len(&req.writable) as u32)
            }
            RequestType::Out => {
                self.check_writable()?;
                let offset = self.data_offset(req.sector, &req.readable)?;
                self.disk.write_vectored_at(&req.readable, offset)?;
                if !self.writeback() {
                    self.disk.flush()?;
                }
                Ok(0)
            }
            RequestType::Flush => {
                if !self.readonly {
                    self.disk.flush()?;
                }
                Ok(0)
            }
            RequestType::GetId => {
                let mut id = [0u8; ID_BYTES];
                let serial = self.serial.as_bytes();
                let n = serial.len().min(ID_BYTES);
                id[..n].copy_from_slice(&serial[..n]);
                let mut written = 0;
                for b in &req.writable {
                    let n = b.len().min(ID_BYTES - written);
                    b.subslice(0, n).map_err(|e| Error::GuestMemory(e.into()))?.copy_from(&id[written..written + n]);
                    written += n;
                    if written == ID_BYTES {
                        break;
                    }
                }
                Ok(written as u32)
            }
            RequestType::Discard | RequestType::WriteZeroes => {
                self.check_writable()?;
                let zero = req.kind == RequestType::WriteZeroes;
                for (sector, sectors, flags) in segments(&req.readable)? {
                    let allowed = if zero { VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP } else { 0 };
                    if flags & !allowed != 0 {
                        return Err(Error::UnsupportedFlags(flags));
                    }
                    if sectors > MAX_DISCARD_SECTORS {
                        return Err(Error::BadSegments(u64::from(sectors)));
                    }
                    let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Error::SectorOutOfRange(sector))?;
                    let len = u64::from(sectors) * SECTOR_SIZE;
                    check_range(self.disk.size(), offset, len)?;
                    if zero {
                        self.disk.write_zeroes(offset, len, flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0)?;
                    } else {
                        self.disk.discard(offset, len)?;
                    }
                }
                if !self.writeback() {
                    self.disk.flush()?;
                }
                Ok(0)
            }
            RequestType::Other(t) => Err(Error::UnsupportedType(t)),
        }
    }

    fn check_writable(&self) -> Result<(), Error> {
        if self.readonly {
            Err(Error::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// Byte offset of a data request, after checking its length and range.
    fn data_offset(&self, sector: u64, bufs: &[Buf<'_>]) -> Result<u64, Error> {
        let len = total_len(bufs);
        if len % SECTOR_SIZE != 0 {
            return Err(Error::UnalignedLength(len));
        }
        let offset = sector.checked_mul(SECTOR_SIZE).ok_or(Error::SectorOutOfRange(sector))?;
        check_range(self.disk.size(), offset, len)?;
        Ok(offset)
    }
}

/// Reads the (sector, num_sectors, flags) segments of a discard or write-zeroes request.
fn segments(bufs: &[Buf<'_>]) -> Result<Vec<(u64, u32, u32)>, Error> {
    let len = total_len(bufs);
    let count = len / SEGMENT_LEN as u64;
    if len == 0 || len % SEGMENT_LEN as u64 != 0 || count > u64::from(MAX_DISCARD_SEGMENTS) {
        return Err(Error::BadSegments(len));
    }
    let mut raw = vec![0u8; len as usize];
    let mut at = 0;
    for b in bufs {
        b.copy_to(&mut raw[at..at + b.len()]);
        at += b.len();
    }
    Ok(raw
        .chunks_exact(SEGMENT_LEN)
        .map(|s| {
            let mut sector = [0u8; 8];
            sector.copy_from_slice(&s[0..8]);
            let le32 = |b: &[u8]| u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            (u64::from_le_bytes(sector), le32(&s[8..12]), le32(&s[12..16]))
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use virtio_queue::desc::RawDescriptor;
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const W: u16 = virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16;
    const MEM_SIZE: u64 = 1 << 20;
    const HDR: u64 = 0x1_0000;
    const DATA: u64 = 0x2_0000;
    const STATUS: u64 = 0x3_0000;

    struct Fixture {
        _file: tempfile::NamedTempFile,
        mem: GuestMemoryMmap,
        dev: BlkDevice,
    }

    /// A 64 KiB disk whose byte i holds i % 251, and 1 MiB of guest memory.
    fn fixture(readonly: bool) -> Fixture {
        let mut file = tempfile::NamedTempFile::new().unwrap();
        let content: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        file.write_all(&content).unwrap();
        let disk = crate::disk::open(file.path(), Some(crate::disk::Format::Raw), readonly).unwrap();
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        Fixture { _file: file, mem, dev: BlkDevice::new(disk, "disk-serial".into(), readonly) }
    }

    fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
        RawDescriptor::from(virtio_queue::desc::split::Descriptor::new(addr, len, flags, 0))
    }

    impl Fixture {
        fn header(&self, kind: u32, sector: u64) {
            self.mem.write_obj(kind.to_le(), GuestAddress(HDR)).unwrap();
            self.mem.write_obj(0u32, GuestAddress(HDR + 4)).unwrap();
            self.mem.write_obj(sector.to_le(), GuestAddress(HDR + 8)).unwrap();
            self.mem.write_obj(0xeeu8, GuestAddress(STATUS)).unwrap();
        }

        /// Runs one chain; returns the used length and the status byte.
        fn run(&self, descs: &[RawDescriptor]) -> (u32, u8) {
            let vq = MockSplitQueue::new(&self.mem, 16);
            let chain = vq.build_desc_chain(descs).unwrap();
            let used = self.dev.process(chain, &self.mem);
            (used, self.mem.read_obj(GuestAddress(STATUS)).unwrap())
        }

        fn read_mem(&self, addr: u64, len: usize) -> Vec<u8> {
            let mut v = vec![0u8; len];
            self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
            v
        }
    }

    const OK: u8 = VIRTIO_BLK_S_OK as u8;
    const IOERR: u8 = VIRTIO_BLK_S_IOERR as u8;
    const UNSUPP: u8 = VIRTIO_BLK_S_UNSUPP as u8;

    #[test]
    fn read_with_header_split_across_descriptors_returns_disk_data() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 2);
        let (used, status) = f.run(&[desc(HDR, 5, 0), desc(HDR + 5, 11, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)]);
        assert_eq!((used, status), (1025, OK));
        let expect: Vec<u8> = (1024..2048u32).map(|i| (i % 251) as u8).collect();
        assert_eq!(f.read_mem(DATA, 1024), expect);
    }

    #[test]
    fn data_and_status_sharing_one_descriptor_is_served() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        let (used, _) = f.run(&[desc(HDR, 16, 0), desc(STATUS - 512, 513, W)]);
        assert_eq!(used, 513);
        assert_eq!(f.mem.read_obj::<u8>(GuestAddress(STATUS)).unwrap(), OK);
        assert_eq!(f.read_mem(STATUS - 512, 4), vec![0, 1, 2, 3]);
    }

    #[test]
    fn write_lands_at_its_sector_and_nowhere_else() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_OUT, 4);
        f.mem.write_slice(&[0xabu8; 512], GuestAddress(DATA)).unwrap();
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]), (1, OK));
        let disk = std::fs::read(f._file.path()).unwrap();
        assert!(disk[2048..2560].iter().all(|&b| b == 0xab));
        assert!(disk[..2048].iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
        assert!(disk[2560..].iter().enumerate().all(|(i, &b)| b == ((i + 2560) % 251) as u8));
    }

    #[test]
    fn write_to_read_only_disk_fails_and_changes_nothing() {
        let f = fixture(true);
        f.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]), (1, IOERR));
        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)]), (1, IOERR));
        let disk = std::fs::read(f._file.path()).unwrap();
        assert!(disk.iter().enumerate().all(|(i, &b)| b == (i % 251) as u8));
    }

    #[test]
    fn out_of_range_sectors_fail_without_overflow() {
        let f = fixture(false);
        for sector in [127, 128, u64::MAX / 512, u64::MAX] {
            f.header(VIRTIO_BLK_T_IN, sector);
            assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 1024, W), desc(STATUS, 1, W)]), (1, IOERR), "{sector}");
        }
    }

    #[test]
    fn unknown_type_is_unsupported() {
        let f = fixture(false);
        f.header(0x1234, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(STATUS, 1, W)]), (1, UNSUPP));
    }

    #[test]
    fn malformed_chains_get_an_error_or_no_status() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_IN, 0);
        // Short header: there is a status byte to report it in.
        assert_eq!(f.run(&[desc(HDR, 8, 0), desc(STATUS, 1, W)]), (1, IOERR));
        // Not a whole sector.
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 100, W), desc(STATUS, 1, W)]), (1, IOERR));
        // Data outside guest memory, or too large: reported in the status byte.
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(MEM_SIZE + 4096, 512, W), desc(STATUS, 1, W)]), (1, IOERR));
        let too_large = (MAX_REQUEST_BYTES + 512) as u32;
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(0, too_large, W), desc(STATUS, 1, W)]), (1, IOERR));
        // Over 4 GiB in all is illegal; the chain ends early and has no status.
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(0, u32::MAX, W), desc(STATUS, 1, W)]).0, 0);
        // Readable after writable.
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 512, W), desc(DATA, 512, 0), desc(STATUS, 1, W)]), (1, IOERR));
        // No writable status byte: nowhere to report, used length 0.
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(STATUS, 1, 0)]).0, 0);
        // Status outside guest memory.
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(MEM_SIZE - 1, 2, W)]).0, 0);
    }

    #[test]
    fn get_id_returns_the_serial_bounded_by_the_buffer() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_GET_ID, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 64, W), desc(STATUS, 1, W)]), (21, OK));
        let mut expect = b"disk-serial".to_vec();
        expect.resize(20, 0);
        assert_eq!(f.read_mem(DATA, 20), expect);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 4, W), desc(STATUS, 1, W)]), (5, OK));
    }

    fn segment(f: &Fixture, at: u64, sector: u64, sectors: u32, flags: u32) {
        f.mem.write_obj(sector.to_le(), GuestAddress(at)).unwrap();
        f.mem.write_obj(sectors.to_le(), GuestAddress(at + 8)).unwrap();
        f.mem.write_obj(flags.to_le(), GuestAddress(at + 12)).unwrap();
    }

    #[test]
    fn write_zeroes_segments_zero_their_ranges() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_WRITE_ZEROES, 0);
        segment(&f, DATA, 8, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        segment(&f, DATA + 16, 32, 1, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 32, 0), desc(STATUS, 1, W)]), (1, OK));
        let disk = std::fs::read(f._file.path()).unwrap();
        for (i, &b) in disk.iter().enumerate() {
            let zeroed = (4096..8192).contains(&i) || (16384..16896).contains(&i);
            assert_eq!(b, if zeroed { 0 } else { (i % 251) as u8 }, "byte {i}");
        }
    }

    #[test]
    fn bad_discard_segments_are_refused() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_DISCARD, 0);
        segment(&f, DATA, 0, 8, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)]), (1, UNSUPP));
        segment(&f, DATA, 120, 16, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 16, 0), desc(STATUS, 1, W)]), (1, IOERR));
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 12, 0), desc(STATUS, 1, W)]), (1, IOERR));
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 16 * 17, 0), desc(STATUS, 1, W)]), (1, IOERR));
    }

    #[test]
    fn a_driver_without_flush_gets_write_through_and_a_later_one_write_back() {
        let f = fixture(false);
        assert!(f.dev.writeback());
        f.dev.negotiated(false);
        assert!(!f.dev.writeback(), "a driver without FLUSH never flushes: writes must be durable");
        f.dev.negotiated(true);
        assert!(f.dev.writeback(), "the next driver negotiated FLUSH");
        // The driver's own choice survives the frontend negotiating again (a VM pause).
        f.dev.set_writeback(false);
        f.dev.negotiated(true);
        assert!(!f.dev.writeback());
    }

    #[test]
    fn flush_succeeds_and_write_through_mode_is_honoured() {
        let f = fixture(false);
        f.header(VIRTIO_BLK_T_FLUSH, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(STATUS, 1, W)]), (1, OK));
        f.dev.set_writeback(false);
        f.header(VIRTIO_BLK_T_OUT, 0);
        assert_eq!(f.run(&[desc(HDR, 16, 0), desc(DATA, 512, 0), desc(STATUS, 1, W)]), (1, OK));
    }

    /// A disk that records what the device asks of it; its flush can be made to fail.
    #[derive(Debug, Default)]
    struct Recorder {
        calls: std::sync::Mutex<Vec<String>>,
        fail_flush: AtomicBool,
    }

    impl Recorder {
        fn log(&self, what: String) {
            self.calls.lock().unwrap().push(what);
        }
    }

    impl DiskFile for Recorder {
        fn size(&self) -> u64 {
            1 << 20
        }
        fn format(&self) -> disk::Format {
            disk::Format::Raw
        }
        fn read_vectored_at(&self, _: &[Buf<'_>], offset: u64) -> disk::Result<()> {
            self.log(format!("read {offset}"));
            Ok(())
        }
        fn write_vectored_at(&self, _: &[Buf<'_>], offset: u64) -> disk::Result<()> {
            self.log(format!("write {offset}"));
            Ok(())
        }
        fn write_batch(&self, writes: &[(u64, &[Buf<'_>])]) -> Vec<disk::Result<()>> {
            let offsets: Vec<u64> = writes.iter().map(|w| w.0).collect();
            self.log(format!("write_batch {offsets:?}"));
            writes.iter().map(|_| Ok(())).collect()
        }
        fn read_batch(&self, reads: &[(u64, &[Buf<'_>])]) -> Vec<disk::Result<()>> {
            let offsets: Vec<u64> = reads.iter().map(|r| r.0).collect();
            self.log(format!("read_batch {offsets:?}"));
            reads.iter().map(|_| Ok(())).collect()
        }
        fn flush(&self) -> disk::Result<()> {
            self.log("flush".into());
            if self.fail_flush.load(Ordering::Relaxed) {
                return Err(disk::Error::Io(std::io::Error::from_raw_os_error(libc::EIO)));
            }
            Ok(())
        }
        fn discard(&self, offset: u64, _: u64) -> disk::Result<()> {
            self.log(format!("discard {offset}"));
            Ok(())
        }
        fn write_zeroes(&self, offset: u64, _: u64, _: bool) -> disk::Result<()> {
            self.log(format!("zeroes {offset}"));
            Ok(())
        }
    }

    /// Runs one batch of chains (write sector 0, FLUSH, write sector 8, read sector 16, each
    /// with its own header and status byte) on a device over `disk`; returns the statuses.
    fn run_mixed_batch(dev: &BlkDevice, mem: &GuestMemoryMmap) -> Vec<u8> {
        use virtio_queue::desc::split::Descriptor as D;
        let kinds = [(VIRTIO_BLK_T_OUT, 0u64), (VIRTIO_BLK_T_FLUSH, 0), (VIRTIO_BLK_T_OUT, 8), (VIRTIO_BLK_T_IN, 16)];
        let mut chains = Vec::new();
        for (i, &(kind, sector)) in kinds.iter().enumerate() {
            let (hdr, data, status) = (HDR + 16 * i as u64, DATA + 4096 * i as u64, STATUS + i as u64);
            mem.write_obj(kind.to_le(), GuestAddress(hdr)).unwrap();
            mem.write_obj(0u32, GuestAddress(hdr + 4)).unwrap();
            mem.write_obj(sector.to_le(), GuestAddress(hdr + 8)).unwrap();
            mem.write_obj(0xeeu8, GuestAddress(status)).unwrap();
            let mut c = vec![D::new(hdr, 16, 0, 0)];
            match kind {
                VIRTIO_BLK_T_OUT => c.push(D::new(data, 512, 0, 0)),
                VIRTIO_BLK_T_IN => c.push(D::new(data, 512, W, 0)),
                _ => {}
            }
            c.push(D::new(status, 1, W, 0));
            chains.push(c);
        }
        let used = dev.process_batch(chains.into_iter().map(Vec::into_iter), mem);
        assert_eq!(used, vec![1, 1, 1, 513]);
        (0..kinds.len() as u64).map(|i| mem.read_obj(GuestAddress(STATUS + i)).unwrap()).collect()
    }

    #[test]
    fn writes_of_a_batch_go_to_the_disk_together_before_its_flush() {
        let disk = Arc::new(Recorder::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dev = BlkDevice::new(disk.clone(), "s".into(), false);
        assert_eq!(run_mixed_batch(&dev, &mem), vec![OK; 4]);
        // The FLUSH runs after the batch's writes have completed, so it covers them too.
        assert_eq!(*disk.calls.lock().unwrap(), ["write_batch [0, 4096]", "flush", "read_batch [8192]"]);
    }

    #[test]
    fn write_through_makes_a_batch_durable_with_one_flush_and_fails_it_whole() {
        let disk = Arc::new(Recorder::default());
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).unwrap();
        let dev = BlkDevice::new(disk.clone(), "s".into(), false);
        dev.set_writeback(false);
        assert_eq!(run_mixed_batch(&dev, &mem), vec![OK; 4]);
        assert_eq!(*disk.calls.lock().unwrap(), ["write_batch [0, 4096]", "flush", "flush", "read_batch [8192]"]);
        // A write is not complete until it is durable: a failed flush fails every write of
        // the batch (and the FLUSH request), never the read.
        disk.fail_flush.store(true, Ordering::Relaxed);
        assert_eq!(run_mixed_batch(&dev, &mem), vec![IOERR, IOERR, IOERR, OK]);
    }
}
