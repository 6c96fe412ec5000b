//! Where the engine keeps its files: a directory of small metadata files and sparse data files.
//!
//! The engine reaches storage only through [`Dir`], so the model tests can run it on memory
//! that forgets unsynced writes at an injected crash ([`mem`]), and production on a real
//! directory ([`FsDir`]).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::disk::{DiskFile, RawDisk};

/// A small file read and written at offsets.
pub trait MetaFile: Send + Sync + fmt::Debug {
    /// Reads up to `buf.len()` bytes at `offset`; fewer only at the end of the file.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize>;
    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Makes every completed write durable.
    fn sync(&self) -> io::Result<()>;
    fn byte_len(&self) -> io::Result<u64>;
    fn set_len(&self, len: u64) -> io::Result<()>;
    /// Allocates `[offset, offset + len)` without changing the file's length, so that writes
    /// there later need no space (a full filesystem fails them no more). Files that cannot
    /// allocate ahead (test doubles) do nothing.
    fn reserve(&self, _offset: u64, _len: u64) -> io::Result<()> {
        Ok(())
    }
}

/// A directory holding a VM's snapshot state.
pub trait Dir: Send + Sync + fmt::Debug {
    /// Where `name` lives, for people and for status.
    fn path(&self, name: &str) -> PathBuf;
    /// Creates `name` empty, replacing any file of that name.
    fn create(&self, name: &str) -> io::Result<Arc<dyn MetaFile>>;
    /// Opens `name`; `None` when there is no such file.
    fn open(&self, name: &str) -> io::Result<Option<Arc<dyn MetaFile>>>;
    /// Creates the data file `name`, sparse, `size` bytes long, replacing any of that name.
    fn create_data(&self, name: &str, size: u64) -> io::Result<Arc<dyn DiskFile>>;
    fn open_data(&self, name: &str) -> io::Result<Arc<dyn DiskFile>>;
    /// Removes `name`; a missing file is not an error.
    fn remove(&self, name: &str) -> io::Result<()>;
    fn list(&self) -> io::Result<Vec<String>>;
    /// Makes creations and removals durable.
    fn sync(&self) -> io::Result<()>;
}

/// A real directory.
#[derive(Debug)]
pub struct FsDir {
    root: PathBuf,
}

impl FsDir {
    /// Uses `root`, creating it if needed.
    pub fn new(root: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(root)?;
        Ok(FsDir { root: root.to_owned() })
    }
}

impl MetaFile for File {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
        let mut n = 0;
        while n < buf.len() {
            match FileExt::read_at(self, &mut buf[n..], offset + n as u64) {
                Ok(0) => break,
                Ok(k) => n += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(n)
    }

    fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.write_all_at(buf, offset)
    }

    fn sync(&self) -> io::Result<()> {
        self.sync_data()
    }

    fn byte_len(&self) -> io::Result<u64> {
        Ok(self.metadata()?.len())
    }

    fn set_len(&self, len: u64) -> io::Result<()> {
        File::set_len(self, len)
    }

    fn reserve(&self, offset: u64, len: u64) -> io::Result<()> {
        crate::sys::fallocate(self, libc::FALLOC_FL_KEEP_SIZE, offset, len)
    }
}

impl FsDir {
    fn open_rw(&self, name: &str, create: bool) -> io::Result<File> {
        OpenOptions::new().read(true).write(true).create(create).truncate(create).open(self.path(name))
    }
}

impl Dir for FsDir {
    fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    fn create(&self, name: &str) -> io::Result<Arc<dyn MetaFile>> {
        Ok(Arc::new(self.open_rw(name, true)?))
    }

    fn open(&self, name: &str) -> io::Result<Option<Arc<dyn MetaFile>>> {
        match self.open_rw(name, false) {
            Ok(f) => Ok(Some(Arc::new(f))),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn create_data(&self, name: &str, size: u64) -> io::Result<Arc<dyn DiskFile>> {
        let file = self.open_rw(name, true)?;
        file.set_len(size)?;
        Ok(Arc::new(RawDisk::new(file)?))
    }

    fn open_data(&self, name: &str) -> io::Result<Arc<dyn DiskFile>> {
        Ok(Arc::new(RawDisk::new(self.open_rw(name, false)?)?))
    }

    fn remove(&self, name: &str) -> io::Result<()> {
        match std::fs::remove_file(self.path(name)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn list(&self) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in std::fs::read_dir(&self.root)? {
            if let Some(name) = entry?.file_name().to_str() {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }

    fn sync(&self) -> io::Result<()> {
        File::open(&self.root)?.sync_all()
    }
}

/// Memory that behaves like a disk across a crash: unsynced writes may be lost.
#[cfg(test)]
pub mod mem {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicI64, Ordering};
    use std::sync::Mutex;

    use super::*;
    use crate::disk::{self, check_range, total_len, Buf, Format};

    /// Counts persistence steps and fails every one after the budget: the injected crash.
    #[derive(Debug, Default)]
    pub struct Fuse(AtomicI64);

    impl Fuse {
        pub fn arm(&self, steps: i64) {
            self.0.store(steps, Ordering::SeqCst);
        }

        pub fn blown(&self) -> bool {
            self.0.load(Ordering::SeqCst) < 0
        }

        fn step(&self) -> io::Result<()> {
            if self.0.fetch_sub(1, Ordering::SeqCst) <= 0 {
                self.0.store(-1, Ordering::SeqCst);
                return Err(io::Error::other("injected crash"));
            }
            Ok(())
        }
    }

    #[derive(Debug, Default)]
    struct Content {
        durable: Vec<u8>,
        current: Vec<u8>,
        unsynced: Vec<(u64, Vec<u8>)>,
    }

    impl Content {
        fn write(&mut self, buf: &[u8], offset: u64) {
            let end = offset as usize + buf.len();
            if self.current.len() < end {
                self.current.resize(end, 0);
            }
            self.current[offset as usize..end].copy_from_slice(buf);
            self.unsynced.push((offset, buf.to_vec()));
        }

        fn sync(&mut self) {
            self.durable = self.current.clone();
            self.unsynced.clear();
        }

        /// Keeps `keep(i)` of the unsynced writes, whole or cut after some sectors.
        fn crash(&mut self, keep: &mut dyn FnMut(usize) -> Option<usize>) {
            let mut durable = std::mem::take(&mut self.durable);
            for (i, (offset, data)) in self.unsynced.drain(..).enumerate() {
                let Some(sectors) = keep(i) else { continue };
                let n = sectors.saturating_mul(512).min(data.len());
                let end = offset as usize + n;
                if durable.len() < end {
                    durable.resize(end, 0);
                }
                durable[offset as usize..end].copy_from_slice(&data[..n]);
            }
            self.current = durable.clone();
            self.durable = durable;
        }
    }

    /// One file of a [`MemDir`].
    #[derive(Debug)]
    pub struct MemFile {
        content: Mutex<Content>,
        fuse: Arc<Fuse>,
        /// Fixed size when used as a data file.
        size: u64,
    }

    impl MemFile {
        fn lock(&self) -> std::sync::MutexGuard<'_, Content> {
            self.content.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        pub fn bytes(&self) -> Vec<u8> {
            self.lock().current.clone()
        }
    }

    impl MetaFile for MemFile {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<usize> {
            let c = self.lock();
            let start = (offset as usize).min(c.current.len());
            let n = buf.len().min(c.current.len() - start);
            buf[..n].copy_from_slice(&c.current[start..start + n]);
            Ok(n)
        }

        fn write_at(&self, buf: &[u8], offset: u64) -> io::Result<()> {
            self.fuse.step()?;
            self.lock().write(buf, offset);
            Ok(())
        }

        fn sync(&self) -> io::Result<()> {
            self.fuse.step()?;
            self.lock().sync();
            Ok(())
        }

        fn byte_len(&self) -> io::Result<u64> {
            Ok(self.lock().current.len() as u64)
        }

        fn set_len(&self, len: u64) -> io::Result<()> {
            self.fuse.step()?;
            let mut c = self.lock();
            // Modelled as durable at once, as the engine syncs after every truncation anyway.
            c.current.resize(len as usize, 0);
            c.durable.resize(len as usize, 0);
            c.unsynced.retain(|(o, _)| *o < len);
            Ok(())
        }
    }

    impl DiskFile for MemFile {
        fn size(&self) -> u64 {
            self.size
        }

        fn format(&self) -> Format {
            Format::Raw
        }

        fn read_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
            check_range(self.size, offset, total_len(bufs))?;
            let c = self.lock();
            let mut pos = offset as usize;
            for b in bufs {
                let mut tmp = vec![0u8; b.len()];
                let avail = c.current.len().saturating_sub(pos).min(tmp.len());
                tmp[..avail].copy_from_slice(&c.current[pos..pos + avail]);
                b.copy_from(&tmp);
                pos += b.len();
            }
            Ok(())
        }

        fn write_vectored_at(&self, bufs: &[Buf<'_>], offset: u64) -> disk::Result<()> {
            check_range(self.size, offset, total_len(bufs))?;
            self.fuse.step()?;
            let mut data = Vec::new();
            for b in bufs {
                let mut tmp = vec![0u8; b.len()];
                b.copy_to(&mut tmp);
                data.extend_from_slice(&tmp);
            }
            self.lock().write(&data, offset);
            Ok(())
        }

        fn flush(&self) -> disk::Result<()> {
            MetaFile::sync(self)?;
            Ok(())
        }

        fn discard(&self, offset: u64, len: u64) -> disk::Result<()> {
            self.write_zeroes(offset, len, true)
        }

        fn write_zeroes(&self, offset: u64, len: u64, _unmap: bool) -> disk::Result<()> {
            check_range(self.size, offset, len)?;
            self.fuse.step()?;
            self.lock().write(&vec![0u8; len as usize], offset);
            Ok(())
        }
    }

    /// A directory in memory whose files lose unsynced writes at [`MemDir::crash`].
    #[derive(Debug, Default)]
    pub struct MemDir {
        files: Mutex<HashMap<String, Arc<MemFile>>>,
        pub fuse: Arc<Fuse>,
    }

    impl MemDir {
        pub fn new(fuse: Arc<Fuse>) -> Self {
            MemDir { files: Mutex::default(), fuse }
        }

        /// A data file outside the directory's names (a base image) sharing its fuse.
        pub fn new_file(fuse: Arc<Fuse>, size: u64) -> Arc<MemFile> {
            let content =
                Content { durable: vec![0; size as usize], current: vec![0; size as usize], unsynced: Vec::new() };
            Arc::new(MemFile { content: Mutex::new(content), fuse, size })
        }

        fn files(&self) -> std::sync::MutexGuard<'_, HashMap<String, Arc<MemFile>>> {
            self.files.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
        }

        pub fn file(&self, name: &str) -> Option<Arc<MemFile>> {
            self.files().get(name).cloned()
        }

        /// Every file keeps what `keep` chooses of its unsynced writes.
        pub fn crash(&self, keep: &mut dyn FnMut(usize) -> Option<usize>) {
            for f in self.files().values() {
                f.lock().crash(keep);
            }
        }

        fn insert(&self, name: &str, size: u64) -> io::Result<Arc<MemFile>> {
            self.fuse.step()?;
            let f = Self::new_file(self.fuse.clone(), size);
            self.files().insert(name.to_owned(), f.clone());
            Ok(f)
        }
    }

    /// Shares one [`MemFile`] as a crash-prone base image.
    pub fn crash_file(f: &MemFile, keep: &mut dyn FnMut(usize) -> Option<usize>) {
        f.lock().crash(keep);
    }

    impl Dir for MemDir {
        fn path(&self, name: &str) -> PathBuf {
            PathBuf::from("/mem").join(name)
        }

        fn create(&self, name: &str) -> io::Result<Arc<dyn MetaFile>> {
            Ok(self.insert(name, 0)?)
        }

        fn open(&self, name: &str) -> io::Result<Option<Arc<dyn MetaFile>>> {
            Ok(self.file(name).map(|f| f as Arc<dyn MetaFile>))
        }

        fn create_data(&self, name: &str, size: u64) -> io::Result<Arc<dyn DiskFile>> {
            Ok(self.insert(name, size)?)
        }

        fn open_data(&self, name: &str) -> io::Result<Arc<dyn DiskFile>> {
            self.file(name).map(|f| f as Arc<dyn DiskFile>).ok_or_else(|| io::ErrorKind::NotFound.into())
        }

        fn remove(&self, name: &str) -> io::Result<()> {
            self.fuse.step()?;
            self.files().remove(name);
            Ok(())
        }

        fn list(&self) -> io::Result<Vec<String>> {
            Ok(self.files().keys().cloned().collect())
        }

        fn sync(&self) -> io::Result<()> {
            self.fuse.step()
        }
    }
}
