//! [`S3Store`]: a repository in an S3-compatible object store, shared by many hosts (feature
//! `s3`).
//!
//! ```text
//! PREFIX/config.json                    the repository's config
//! PREFIX/chunks/XX/HASH                 one object per distinct chunk (same bytes as a chunk file)
//! PREFIX/backups/VM/ID/DISK.manifest    the manifest of one disk in one backup
//! PREFIX/backups/VM/ID/commit           the commit object: the backup exists when it does
//! PREFIX/writers/VM/ID-NONCE            a writer at work (from its begin to its commit or end)
//! PREFIX/gc/NONCE                       a garbage collection: running, then done
//! ```
//!
//! No lock holds across hosts, so collection works by time, on the store's clock (each
//! object's last-modified time; hosts' clocks are never compared). With `G` the grace period:
//!
//! - a writer puts its marker first; it commits within `G/2` of it (or fails); a chunk it finds
//!   stored that was last written more than `G/2` ago is written again (refreshed), so every
//!   chunk it relies on is younger than `G` until it commits; before its commit object it waits
//!   for any collection that is running, and if one ran since its marker, checks that every
//!   chunk it wrote, found or reused is still stored (else it fails: nothing is committed);
//! - a collection puts its record first (its start `T0`), lists the chunks, then the live
//!   markers (younger than `G`), then the committed backups; it marks every chunk the committed
//!   manifests name and every chunk any manifest of a VM with a live marker names (committed or
//!   not: a deleted parent of a running incremental keeps its chunks); it removes unmarked
//!   chunks last written before `T0 - G`, for at most `G/4`, then marks its record done.
//!
//! The reasoning is in docs/repository.md ("Many hosts, one bucket").

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::fmt;
use std::path::Path as FsPath;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::path::Path;
use object_store::{BackoffConfig, ClientOptions, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig};
use serde::{Deserialize, Serialize};

use super::{Error, Fetched, GcRun, PendingBackup, Protected, Result, Store, StoreLock};
use crate::hash::ChunkHash;
use crate::validate_name;

const MANIFEST_SUFFIX: &str = ".manifest";
const COMMIT: &str = "commit";
const MAX_COMMIT_LEN: u64 = 64 * 1024;
const MAX_RECORD_LEN: u64 = 4 * 1024;
/// Added to every time comparison on the conservative side: `Last-Modified` of a HEAD has
/// whole seconds.
const SLACK_US: i64 = 2_000_000;
/// Parallel requests of one check (chunks re-read at commit).
const PARALLEL: usize = 32;
/// The shortest grace period accepted.
pub const MIN_GRACE: Duration = Duration::from_secs(8);

/// `s3://BUCKET/PREFIX`: where a repository is in an object store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct S3Url {
    pub bucket: String,
    /// Without leading or trailing `/`; may be empty.
    pub prefix: String,
}

impl S3Url {
    /// Parses `s3://BUCKET[/PREFIX]`: a bucket name of 3 to 63 lowercase letters, digits, `.`
    /// and `-`; a prefix of `/`-separated names (letters, digits, `.`, `_`, `-`).
    pub fn parse(url: &str) -> Result<S3Url> {
        let bad = |reason: &str| Error::InvalidUrl { url: url.to_owned(), reason: reason.to_owned() };
        let rest = url.strip_prefix("s3://").ok_or_else(|| bad("it does not begin with s3://"))?;
        let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
        let bucket_ok = (3..=63).contains(&bucket.len())
            && bucket.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-')
            && bucket.as_bytes()[0].is_ascii_alphanumeric();
        if !bucket_ok {
            return Err(bad("the bucket is not 3 to 63 lowercase letters, digits, `.` and `-`"));
        }
        let prefix = prefix.trim_end_matches('/');
        if !prefix.is_empty() && prefix.split('/').any(|p| validate_name("prefix", p).is_err()) {
            return Err(bad("the prefix is not `/`-separated names of letters, digits, `.`, `_` and `-`"));
        }
        Ok(S3Url { bucket: bucket.to_owned(), prefix: prefix.to_owned() })
    }
}

impl fmt::Display for S3Url {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "s3://{}/{}", self.bucket, self.prefix)
    }
}

/// An access key: read from a file of mode 0600 (`access_key_id = "…"`,
/// `secret_access_key = "…"`, one per line). The secret never appears in `Debug`.
#[derive(Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials").field("access_key_id", &self.access_key_id).finish_non_exhaustive()
    }
}

impl Credentials {
    /// Reads the credentials file `path`; refuses one that others may read or write.
    pub fn load(path: &FsPath) -> Result<Credentials> {
        use std::os::unix::fs::MetadataExt;
        let text =
            std::fs::read_to_string(path).map_err(|source| Error::Credentials { path: path.to_owned(), source })?;
        let mode =
            std::fs::metadata(path).map_err(|source| Error::Credentials { path: path.to_owned(), source })?.mode()
                & 0o777;
        if mode & 0o077 != 0 {
            return Err(Error::CredentialsMode { path: path.to_owned(), mode });
        }
        let invalid = |reason: String| Error::CredentialsInvalid { path: path.to_owned(), reason };
        let c: Credentials = parse_credentials(&text).map_err(invalid)?;
        let printable = |s: &str| !s.is_empty() && s.len() <= 256 && s.bytes().all(|b| b.is_ascii_graphic());
        if !printable(&c.access_key_id) || !printable(&c.secret_access_key) {
            return Err(invalid("a key is empty, too long or not printable ASCII".into()));
        }
        Ok(c)
    }
}

/// `key = "value"` lines; the message never quotes the file (it holds a secret).
fn parse_credentials(text: &str) -> std::result::Result<Credentials, String> {
    let mut id = None;
    let mut secret = None;
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {} is not `key = \"value\"`", n + 1));
        };
        let v = v.trim();
        let v = v.strip_prefix('"').and_then(|v| v.strip_suffix('"')).unwrap_or(v).to_owned();
        match k.trim() {
            "access_key_id" => id = Some(v),
            "secret_access_key" => secret = Some(v),
            other => return Err(format!("line {} has an unknown key `{other}`", n + 1)),
        }
    }
    match (id, secret) {
        (Some(access_key_id), Some(secret_access_key)) => Ok(Credentials { access_key_id, secret_access_key }),
        _ => Err("it needs both access_key_id and secret_access_key".into()),
    }
}

/// How to reach the store and how long things may take.
#[derive(Clone, Debug)]
pub struct S3Options {
    pub url: S3Url,
    /// `http://HOST:PORT` or `https://…`.
    pub endpoint: String,
    pub region: String,
    pub credentials: Credentials,
    /// Garbage collection removes only unreferenced chunks last written longer ago than this;
    /// a backup must commit within half of it. Every host sharing a bucket uses the same.
    pub grace: Duration,
    /// Retries of one request (with exponential backoff), and the time they may take in all.
    pub retries: usize,
    pub retry_timeout: Duration,
    /// One request's connect and whole-request time limits.
    pub connect_timeout: Duration,
    pub timeout: Duration,
}

impl S3Options {
    /// Defaults: a grace period of a day (a backup must commit within 12 hours), 4 retries
    /// within 30 s, 5 s to connect, 60 s per request.
    pub fn new(url: S3Url, endpoint: String, region: String, credentials: Credentials) -> S3Options {
        S3Options {
            url,
            endpoint,
            region,
            credentials,
            grace: Duration::from_secs(24 * 3600),
            retries: 4,
            retry_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(5),
            timeout: Duration::from_secs(60),
        }
    }
}

/// The committed backups by VM, and the uncommitted manifests `(id, disk, last modified)` by VM.
type Scan = (BTreeMap<String, BTreeSet<String>>, BTreeMap<String, Vec<(String, String, i64)>>);

/// The chunks a writer of this process relies on (see [`S3Store`]'s commit check).
type Relied = Arc<Mutex<HashSet<ChunkHash>>>;

/// A repository under a prefix of a bucket. Cheap to clone (one client, one runtime).
#[derive(Clone)]
pub struct S3Store {
    inner: Arc<Inner>,
}

impl std::ops::Deref for S3Store {
    type Target = Inner;
    fn deref(&self) -> &Inner {
        &self.inner
    }
}

/// What a store and its pending backups share.
pub struct Inner {
    client: Arc<AmazonS3>,
    rt: Option<tokio::runtime::Runtime>,
    url: S3Url,
    endpoint: String,
    grace_us: i64,
    /// Writers of this process at work: every chunk put, found or looked up is added to each.
    writers: Mutex<Vec<Weak<Mutex<HashSet<ChunkHash>>>>>,
    /// The store's clock as last read here: `(last-modified µs, when it was read)`.
    clock: Mutex<Option<(i64, Instant)>>,
}

impl fmt::Debug for S3Store {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.inner.fmt(f)
    }
}

impl fmt::Debug for Inner {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Store").field("url", &self.url).field("endpoint", &self.endpoint).finish_non_exhaustive()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Dropping a runtime blocks, which panics inside another runtime (a daemon dropping its
        // repository at the end of its async main): let its threads end by themselves.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// A writer's marker or a collection's record.
#[derive(Debug, Serialize, Deserialize)]
struct Record {
    host: String,
    pid: u32,
    #[serde(default)]
    done: bool,
}

impl Record {
    fn new(done: bool) -> Record {
        let host =
            std::fs::read_to_string("/proc/sys/kernel/hostname").map(|h| h.trim().to_owned()).unwrap_or_default();
        Record { host, pid: std::process::id(), done }
    }
}

/// The commit object of a backup.
#[derive(Debug, Serialize, Deserialize)]
struct Commit {
    disks: Vec<String>,
}

fn nonce() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let t = crate::now_unix_us();
    format!("{t:x}-{:x}-{:x}", std::process::id(), N.fetch_add(1, Ordering::Relaxed))
}

impl S3Store {
    /// The store of `opts` (nothing is read yet). Requests retry with backoff and give up
    /// within `opts.retry_timeout`.
    pub fn open(opts: &S3Options) -> Result<S3Store> {
        if opts.grace < MIN_GRACE {
            return Err(Error::InvalidUrl {
                url: opts.url.to_string(),
                reason: format!("the grace period is shorter than {} s", MIN_GRACE.as_secs()),
            });
        }
        let endpoint_ok = (opts.endpoint.starts_with("http://") || opts.endpoint.starts_with("https://"))
            && opts.endpoint.len() > "https://".len();
        if !endpoint_ok {
            return Err(Error::InvalidUrl {
                url: opts.endpoint.clone(),
                reason: "the endpoint is not an http:// or https:// URL".into(),
            });
        }
        let retry = RetryConfig {
            backoff: BackoffConfig {
                init_backoff: Duration::from_millis(100),
                max_backoff: Duration::from_secs(5),
                base: 2.0,
            },
            max_retries: opts.retries,
            retry_timeout: opts.retry_timeout,
        };
        let client = AmazonS3Builder::new()
            .with_bucket_name(&opts.url.bucket)
            .with_region(&opts.region)
            .with_endpoint(&opts.endpoint)
            .with_access_key_id(&opts.credentials.access_key_id)
            .with_secret_access_key(&opts.credentials.secret_access_key)
            .with_virtual_hosted_style_request(false)
            .with_retry(retry)
            .with_client_options(
                // The client options carry `allow_http` too: set here, not on the builder (this
                // call would reset it).
                ClientOptions::new()
                    .with_allow_http(opts.endpoint.starts_with("http://"))
                    .with_connect_timeout(opts.connect_timeout)
                    .with_timeout(opts.timeout),
            )
            .build()
            .map_err(|source| Error::S3Client { url: opts.url.to_string(), source: Box::new(source) })?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("s3-io")
            .enable_all()
            .build()
            .map_err(Error::Runtime)?;
        let grace_us = i64::try_from(opts.grace.as_micros()).unwrap_or(i64::MAX / 4);
        Ok(S3Store {
            inner: Arc::new(Inner {
                client: Arc::new(client),
                rt: Some(rt),
                url: opts.url.clone(),
                endpoint: opts.endpoint.clone(),
                grace_us,
                writers: Mutex::new(Vec::new()),
                clock: Mutex::new(None),
            }),
        })
    }

    /// As [`S3Store::open`], for a new repository: the prefix must hold no object.
    pub fn create(opts: &S3Options) -> Result<S3Store> {
        let store = S3Store::open(opts)?;
        if !store.is_empty()? {
            return Err(Error::NotEmptyPrefix(store.location()));
        }
        Ok(store)
    }
}

impl Inner {
    /// Whether no object is under the prefix.
    pub fn is_empty(&self) -> Result<bool> {
        let prefix = self.key("");
        let first = self.run("list", &prefix, {
            let client = self.client.clone();
            let prefix = prefix.clone();
            async move { client.list(Some(&prefix)).next().await.transpose() }
        })?;
        Ok(first.is_none())
    }

    /// The grace period.
    pub fn grace(&self) -> Duration {
        Duration::from_micros(self.grace_us as u64)
    }

    fn key(&self, rel: &str) -> Path {
        if self.url.prefix.is_empty() {
            Path::from(rel)
        } else if rel.is_empty() {
            Path::from(self.url.prefix.as_str())
        } else {
            Path::from(format!("{}/{rel}", self.url.prefix))
        }
    }

    /// The key relative to the prefix.
    fn rel<'a>(&self, key: &'a Path) -> &'a str {
        let k = key.as_ref();
        if self.url.prefix.is_empty() {
            k
        } else {
            k.strip_prefix(self.url.prefix.as_str()).and_then(|k| k.strip_prefix('/')).unwrap_or(k)
        }
    }

    fn chunk_key(&self, hash: &ChunkHash) -> Path {
        self.key(&format!("chunks/{:02x}/{hash}", hash.0[0]))
    }

    fn manifest_key(&self, vm: &str, id: &str, disk: &str) -> Path {
        self.key(&format!("backups/{vm}/{id}/{disk}{MANIFEST_SUFFIX}"))
    }

    fn commit_key(&self, vm: &str, id: &str) -> Path {
        self.key(&format!("backups/{vm}/{id}/{COMMIT}"))
    }

    /// Runs one request on the store's runtime and waits for it. It is spawned there and
    /// awaited through a channel rather than with `block_on`, so any thread may call it,
    /// including a `spawn_blocking` thread of another runtime (where `block_on` would panic).
    fn run<T, F>(&self, op: &'static str, key: &Path, fut: F) -> Result<T>
    where
        T: Send + 'static,
        F: std::future::Future<Output = object_store::Result<T>> + Send + 'static,
    {
        let rt = self.rt.as_ref().ok_or(Error::Stopped)?;
        let (tx, rx) = std::sync::mpsc::sync_channel(1);
        rt.spawn(async move {
            let _ = tx.send(fut.await);
        });
        rx.recv().map_err(|_| Error::Stopped)?.map_err(|source| self.error(op, key, source))
    }

    fn error(&self, op: &'static str, key: &Path, source: object_store::Error) -> Error {
        let remote = Remote::of(&source);
        let denied = matches!(
            source,
            object_store::Error::PermissionDenied { .. } | object_store::Error::Unauthenticated { .. }
        ) || matches!(remote.status, Some(401 | 403));
        if denied {
            let store = format!("bucket {} at {}", self.url.bucket, self.endpoint);
            return Error::S3Denied { store, source: remote };
        }
        Error::S3 { op, object: format!("`s3://{}/{key}` at {}", self.url.bucket, self.endpoint), source: remote }
    }

    /// HEAD: the object's last-modified time (µs, store clock) and size; `None` when absent.
    fn head(&self, key: &Path) -> Result<Option<(i64, u64)>> {
        let client = self.client.clone();
        let k = key.clone();
        self.run("look up", key, async move {
            match client.head(&k).await {
                Ok(m) => Ok(Some((m.last_modified.timestamp_micros(), m.size))),
                Err(object_store::Error::NotFound { .. }) => Ok(None),
                Err(e) => Err(e),
            }
        })
    }

    fn put(&self, key: &Path, data: &[u8]) -> Result<()> {
        let client = self.client.clone();
        let payload = bytes_of(data);
        let k = key.clone();
        self.run("write", key, async move { client.put(&k, payload).await.map(|_| ()) })
    }

    fn delete(&self, key: &Path) -> Result<()> {
        let client = self.client.clone();
        let k = key.clone();
        self.run("remove", key, async move {
            match client.delete(&k).await {
                Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
                Err(e) => Err(e),
            }
        })
    }

    /// GET of a whole object of at most `max_len` bytes.
    fn get(&self, key: &Path, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        let client = self.client.clone();
        let k = key.clone();
        let got = self.run("read", key, async move {
            let r = match client.get(&k).await {
                Ok(r) => r,
                Err(object_store::Error::NotFound { .. }) => return Ok(Err(Fetched::Missing)),
                Err(e) => return Err(e),
            };
            if r.meta.size > max_len {
                return Ok(Err(Fetched::TooLong(r.meta.size)));
            }
            r.bytes().await.map(Ok)
        })?;
        match got {
            Err(f) => Ok(f),
            Ok(b) if b.len() as u64 > max_len => Ok(Fetched::TooLong(b.len() as u64)),
            Ok(b) => {
                out.clear();
                out.extend_from_slice(&b);
                Ok(Fetched::Found)
            }
        }
    }

    /// Every object under `rel` (relative to the prefix), with its last-modified time and size.
    fn list(&self, rel: &str) -> Result<Vec<(String, i64, u64)>> {
        let key = self.key(rel);
        let client = self.client.clone();
        let k = key.clone();
        let metas: Vec<object_store::ObjectMeta> =
            self.run("list", &key, async move { client.list(Some(&k)).try_collect().await })?;
        Ok(metas
            .into_iter()
            .map(|m| (self.rel(&m.location).to_owned(), m.last_modified.timestamp_micros(), m.size))
            .collect())
    }

    /// Writes `key` and reads back its last-modified time: now, on the store's clock.
    fn put_timed(&self, key: &Path, data: &[u8]) -> Result<i64> {
        self.put(key, data)?;
        match self.head(key)? {
            Some((t, _)) => Ok(t),
            None => Err(Error::Vanished(format!("s3://{}/{key}", self.url.bucket))),
        }
    }

    fn note_relied(&self, hash: &ChunkHash) {
        let mut writers = lock(&self.writers);
        writers.retain(|w| match w.upgrade() {
            Some(set) => {
                lock(&set).insert(*hash);
                true
            }
            None => false,
        });
    }

    /// The committed backups of every VM: `vm -> id -> disks`, and the uncommitted manifests'
    /// keys by VM.
    fn scan_backups(&self) -> Result<Scan> {
        let mut committed: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        let mut manifests: BTreeMap<(String, String), Vec<(String, i64)>> = BTreeMap::new();
        for (rel, t, _) in self.list("backups")? {
            let parts: Vec<&str> = rel.split('/').collect();
            let [_, vm, id, name] = parts[..] else { continue };
            if validate_name("VM", vm).is_err() || validate_name("backup", id).is_err() {
                continue;
            }
            if name == COMMIT {
                committed.entry(vm.to_owned()).or_default().insert(id.to_owned());
            } else if let Some(disk) = name.strip_suffix(MANIFEST_SUFFIX) {
                if validate_name("disk", disk).is_ok() {
                    manifests.entry((vm.to_owned(), id.to_owned())).or_default().push((disk.to_owned(), t));
                }
            }
        }
        let mut uncommitted: BTreeMap<String, Vec<(String, String, i64)>> = BTreeMap::new();
        for ((vm, id), disks) in manifests {
            if committed.get(&vm).is_some_and(|ids| ids.contains(&id)) {
                continue;
            }
            let v = uncommitted.entry(vm.clone()).or_default();
            v.extend(disks.into_iter().map(|(d, t)| (id.clone(), d, t)));
        }
        Ok((committed, uncommitted))
    }

    /// Writers' markers: `(vm, key, last modified)`.
    fn markers(&self) -> Result<Vec<(String, String, i64)>> {
        let mut out = Vec::new();
        for (rel, t, _) in self.list("writers")? {
            let mut parts = rel.split('/').skip(1);
            if let (Some(vm), Some(_), None) = (parts.next(), parts.next(), parts.next()) {
                out.push((vm.to_owned(), rel.clone(), t));
            }
        }
        Ok(out)
    }

    /// Collections' records: `(rel key, last modified, done)`.
    fn gc_records(&self) -> Result<Vec<(String, i64, bool)>> {
        let mut out = Vec::new();
        for (rel, t, _) in self.list("gc")? {
            let mut buf = Vec::new();
            let done = match self.get(&self.key(&rel), MAX_RECORD_LEN, &mut buf)? {
                Fetched::Found => serde_json::from_slice::<Record>(&buf).map(|r| r.done).unwrap_or(false),
                // Removed meanwhile: done.
                _ => true,
            };
            out.push((rel, t, done));
        }
        Ok(out)
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

fn bytes_of(data: &[u8]) -> object_store::PutPayload {
    PutPayload::from(data.to_vec())
}

impl Store for S3Store {
    fn location(&self) -> String {
        format!("{} at {}", self.url, self.endpoint)
    }

    fn get_config(&self, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        self.get(&self.key("config.json"), max_len, out)
    }

    fn put_config(&self, data: &[u8]) -> Result<()> {
        self.put(&self.key("config.json"), data)
    }

    fn has_chunk(&self, hash: &ChunkHash) -> Result<bool> {
        let found = self.head(&self.chunk_key(hash))?.is_some();
        if found {
            self.note_relied(hash);
        }
        Ok(found)
    }

    fn put_chunk(&self, hash: &ChunkHash, data: &[u8]) -> Result<bool> {
        let key = self.chunk_key(hash);
        self.note_relied(hash);
        match self.head(&key)? {
            None => {
                self.put(&key, data)?;
                Ok(true)
            }
            Some((modified, _)) => {
                // Found stored: refreshed when it may be old enough for a collection to take it
                // before this backup commits. Compared with the newest marker's start, the
                // store's clock seen from here.
                let now = self.store_now();
                if now.is_none_or(|now| now - modified > self.grace_us / 2 - 2 * SLACK_US) {
                    self.put(&key, data)?;
                }
                Ok(false)
            }
        }
    }

    fn get_chunk(&self, hash: &ChunkHash, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        self.get(&self.chunk_key(hash), max_len, out)
    }

    fn flush_chunks(&self, _hashes: &[ChunkHash]) -> Result<()> {
        // A PUT is durable when it answers.
        Ok(())
    }

    fn list_chunks(&self) -> Result<Vec<(ChunkHash, u64)>> {
        Ok(self.list("chunks")?.into_iter().filter_map(|(rel, _, len)| Some((parse_chunk(&rel)?, len))).collect())
    }

    fn remove_chunk(&self, hash: &ChunkHash) -> Result<()> {
        self.delete(&self.chunk_key(hash))
    }

    fn list_vms(&self) -> Result<Vec<String>> {
        Ok(self.scan_backups()?.0.into_keys().collect())
    }

    fn list_backups(&self, vm: &str) -> Result<Vec<String>> {
        let mut ids = BTreeSet::new();
        for (rel, _, _) in self.list(&format!("backups/{vm}"))? {
            let parts: Vec<&str> = rel.split('/').collect();
            if let [_, _, id, COMMIT] = parts[..] {
                if validate_name("backup", id).is_ok() {
                    ids.insert(id.to_owned());
                }
            }
        }
        Ok(ids.into_iter().collect())
    }

    fn list_manifests(&self, vm: &str, id: &str) -> Result<Option<Vec<String>>> {
        let key = self.commit_key(vm, id);
        let mut buf = Vec::new();
        match self.get(&key, MAX_COMMIT_LEN, &mut buf)? {
            Fetched::Found => {}
            Fetched::Missing => return Ok(None),
            Fetched::TooLong(len) => {
                return Err(Error::Invalid { key: key.to_string(), reason: format!("it is {len} bytes long") })
            }
        }
        let invalid = |reason: String| Error::Invalid { key: key.to_string(), reason };
        let c: Commit = serde_json::from_slice(&buf).map_err(|e| invalid(e.to_string()))?;
        let mut disks = c.disks;
        if let Some(bad) = disks.iter().find(|d| validate_name("disk", d).is_err()) {
            return Err(invalid(format!("it names disk {bad:?}")));
        }
        disks.sort();
        disks.dedup();
        Ok(Some(disks))
    }

    fn get_manifest(&self, vm: &str, id: &str, disk: &str, max_len: u64, out: &mut Vec<u8>) -> Result<Fetched> {
        if self.head(&self.commit_key(vm, id))?.is_none() {
            return Ok(Fetched::Missing);
        }
        self.get(&self.manifest_key(vm, id, disk), max_len, out)
    }

    fn get_manifest_prefix(&self, vm: &str, id: &str, disk: &str, len: u64, out: &mut Vec<u8>) -> Result<Option<u64>> {
        if self.head(&self.commit_key(vm, id))?.is_none() {
            return Ok(None);
        }
        let key = self.manifest_key(vm, id, disk);
        let Some((_, size)) = self.head(&key)? else { return Ok(None) };
        let end = len.min(size);
        let client = self.client.clone();
        let k = key.clone();
        let bytes = self.run("read", &key, async move {
            if end == 0 {
                return Ok(Default::default());
            }
            client.get_range(&k, 0..end).await
        })?;
        out.clear();
        out.extend_from_slice(&bytes);
        Ok(Some(size))
    }

    fn begin_backup(&self, vm: &str, id: &str) -> Result<Box<dyn PendingBackup>> {
        if self.head(&self.commit_key(vm, id))?.is_some() {
            return Err(Error::BackupExists { vm: vm.into(), id: id.into() });
        }
        let marker = self.key(&format!("writers/{vm}/{id}-{}", nonce()));
        let body = serde_json::to_vec(&Record::new(false))
            .map_err(|e| Error::Invalid { key: marker.to_string(), reason: e.to_string() })?;
        let started = self.put_timed(&marker, &body)?;
        self.set_clock(started);
        let relied: Relied = Arc::new(Mutex::new(HashSet::new()));
        lock(&self.writers).push(Arc::downgrade(&relied));
        Ok(Box::new(S3Pending {
            store: self.inner.clone(),
            vm: vm.to_owned(),
            id: id.to_owned(),
            marker,
            started,
            clock: Instant::now(),
            disks: Vec::new(),
            relied,
            committed: false,
        }))
    }

    fn remove_backup(&self, vm: &str, id: &str) -> Result<bool> {
        let key = self.commit_key(vm, id);
        if self.head(&key)?.is_none() {
            return Ok(false);
        }
        // The backup vanishes with its commit object; its manifests stay until a collection
        // finds no writer of the VM that may rely on them (a parent of a running incremental).
        self.delete(&key)?;
        Ok(true)
    }

    fn lock_shared(&self) -> Result<StoreLock> {
        Ok(StoreLock::new(Box::new("no lock across hosts: see S3Store")))
    }

    fn lock_exclusive(&self) -> Result<StoreLock> {
        Ok(StoreLock::new(Box::new("no lock across hosts: see S3Store")))
    }

    fn begin_gc(&self) -> Result<Box<dyn GcRun + '_>> {
        let key = self.key(&format!("gc/{}", nonce()));
        let body = serde_json::to_vec(&Record::new(false)).unwrap_or_default();
        let started = self.put_timed(&key, &body)?;
        self.set_clock(started);
        Ok(Box::new(S3Gc { store: self, key, started, clock: Instant::now(), done: false }))
    }

    fn remove_leftovers(&self) -> Result<u64> {
        let mut removed = 0;
        let now = self.store_now_for_gc()?;
        let markers = self.markers()?;
        let live: BTreeSet<&str> =
            markers.iter().filter(|(_, _, t)| now - t < self.grace_us).map(|(vm, _, _)| vm.as_str()).collect();
        for (vm, rel, t) in &markers {
            if now - t >= self.grace_us {
                tracing::warn!(vm, marker = rel, "removing the marker of a writer that did not finish");
                self.delete(&self.key(rel))?;
                removed += 1;
            }
        }
        for (rel, t, done) in self.gc_records()? {
            if now - t >= self.grace_us || (done && now - t >= self.grace_us / 2 + SLACK_US) {
                self.delete(&self.key(&rel))?;
                removed += 1;
            }
        }
        // A manifest without a commit object is a leftover only once older than the grace
        // period: a writer that began after the markers were listed stages manifests younger
        // than that, and commits them within half of it.
        let (_, uncommitted) = self.scan_backups()?;
        for (vm, manifests) in uncommitted {
            if live.contains(vm.as_str()) {
                continue;
            }
            for (id, disk, t) in manifests {
                if now - t < self.grace_us + SLACK_US {
                    continue;
                }
                self.delete(&self.manifest_key(&vm, &id, &disk))?;
                removed += 1;
            }
        }
        Ok(removed)
    }
}

impl Inner {
    /// Now on the store's clock, from the newest writer or collection start here; `None`
    /// before any.
    fn store_now(&self) -> Option<i64> {
        lock(&self.clock).map(|(t, at)| t + at.elapsed().as_micros() as i64)
    }

    fn set_clock(&self, t: i64) {
        *lock(&self.clock) = Some((t, Instant::now()));
    }

    /// Now on the store's clock, asking the store (a collection's record was just written).
    fn store_now_for_gc(&self) -> Result<i64> {
        if let Some(t) = self.store_now() {
            return Ok(t);
        }
        let key = self.key(&format!("gc/clock-{}", nonce()));
        let t = self.put_timed(&key, b"{}")?;
        self.delete(&key)?;
        Ok(t)
    }
}

fn parse_chunk(rel: &str) -> Option<ChunkHash> {
    let mut parts = rel.split('/');
    match (parts.next(), parts.next(), parts.next(), parts.next()) {
        (Some("chunks"), Some(_), Some(name), None) => name.parse().ok(),
        _ => None,
    }
}

/// A backup being written: its marker is in `writers/`.
struct S3Pending {
    store: Arc<Inner>,
    vm: String,
    id: String,
    marker: Path,
    /// The marker's last-modified time: the writer's start on the store's clock.
    started: i64,
    clock: Instant,
    disks: Vec<String>,
    relied: Relied,
    committed: bool,
}

impl fmt::Debug for S3Pending {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Pending").field("vm", &self.vm).field("id", &self.id).finish_non_exhaustive()
    }
}

impl S3Pending {
    fn now(&self) -> i64 {
        self.started + self.clock.elapsed().as_micros() as i64
    }

    /// Waits for the collections running now; true when any ran since this writer began.
    fn collections_since_start(&self) -> Result<bool> {
        let s = &*self.store;
        let deadline = Instant::now() + Duration::from_micros((s.grace_us / 2) as u64);
        loop {
            let now = self.now();
            let mut running = false;
            let mut overlapped = false;
            for (_, t, done) in s.gc_records()? {
                // A collection removes nothing after G/4 from its start: one older than that
                // and not done has stopped.
                let alive = !done && now - t < s.grace_us / 4 + SLACK_US;
                running |= alive;
                // Done at `t` (its last write), or started at `t` and running or stopped.
                let end = if done { t } else { t + s.grace_us / 4 };
                overlapped |= end + SLACK_US >= self.started;
            }
            if !running {
                return Ok(overlapped);
            }
            if Instant::now() >= deadline {
                return Err(Error::Busy);
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Every chunk relied on that is no longer stored.
    fn missing_chunks(&self) -> Result<Vec<ChunkHash>> {
        let s = &*self.store;
        let hashes: Vec<ChunkHash> = lock(&self.relied).iter().copied().collect();
        let client = s.client.clone();
        let keys: Vec<(ChunkHash, Path)> = hashes.iter().map(|h| (*h, s.chunk_key(h))).collect();
        let probe = s.key("chunks");
        s.run("look up", &probe, async move {
            futures::stream::iter(keys)
                .map(|(h, k)| {
                    let client = client.clone();
                    async move {
                        match client.head(&k).await {
                            Ok(_) => Ok(None),
                            Err(object_store::Error::NotFound { .. }) => Ok(Some(h)),
                            Err(e) => Err(e),
                        }
                    }
                })
                .buffer_unordered(PARALLEL)
                .try_filter_map(|x| async move { Ok(x) })
                .try_collect()
                .await
        })
    }
}

impl PendingBackup for S3Pending {
    fn put_manifest(&mut self, disk: &str, data: &[u8]) -> Result<()> {
        let s = &*self.store;
        s.put(&s.manifest_key(&self.vm, &self.id, disk), data)?;
        self.disks.push(disk.to_owned());
        Ok(())
    }

    fn commit(mut self: Box<Self>) -> Result<()> {
        let s = &*self.store;
        if self.collections_since_start()? {
            let missing = self.missing_chunks()?;
            if let Some(first) = missing.first() {
                return Err(Error::ChunkCollected {
                    backup: format!("{}/{}", self.vm, self.id),
                    hash: Box::new(*first),
                });
            }
        }
        // After the wait and the check: what protects this writer's chunks from a collection
        // that starts now is that they are younger than the grace period until the commit
        // object is put, a few requests from here.
        let key = s.commit_key(&self.vm, &self.id);
        let age = self.now() - self.started;
        if age + SLACK_US > s.grace_us / 2 {
            return Err(Error::TooSlow {
                backup: format!("{}/{}", self.vm, self.id),
                secs: (age / 1_000_000) as u64,
                grace_secs: (s.grace_us / 1_000_000) as u64,
            });
        }
        if s.head(&key)?.is_some() {
            return Err(Error::BackupExists { vm: self.vm.clone(), id: self.id.clone() });
        }
        let body = serde_json::to_vec(&Commit { disks: self.disks.clone() })
            .map_err(|e| Error::Invalid { key: key.to_string(), reason: e.to_string() })?;
        s.put(&key, &body)?;
        self.committed = true;
        if let Err(e) = s.delete(&self.marker) {
            tracing::warn!(error = %e, "cannot remove a writer's marker: a collection removes it later");
        }
        Ok(())
    }
}

impl Drop for S3Pending {
    fn drop(&mut self) {
        let s = &*self.store;
        if !self.committed {
            for d in &self.disks {
                if let Err(e) = s.delete(&s.manifest_key(&self.vm, &self.id, d)) {
                    tracing::warn!(error = %e, "cannot remove a staged manifest: a collection removes it later");
                }
            }
            if let Err(e) = s.delete(&self.marker) {
                tracing::warn!(error = %e, "cannot remove a writer's marker: a collection removes it later");
            }
        }
    }
}

/// A collection at work: its record is in `gc/`.
struct S3Gc<'s> {
    store: &'s S3Store,
    key: Path,
    /// The record's last-modified time: the collection's start on the store's clock.
    started: i64,
    clock: Instant,
    done: bool,
}

impl fmt::Debug for S3Gc<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("S3Gc").field("key", &self.key).field("started", &self.started).finish_non_exhaustive()
    }
}

impl GcRun for S3Gc<'_> {
    fn candidates(&mut self) -> Result<Vec<(ChunkHash, u64)>> {
        let s = self.store;
        let cutoff = self.started - s.grace_us;
        Ok(s.list("chunks")?
            .into_iter()
            .filter(|(_, t, _)| *t < cutoff)
            .filter_map(|(rel, _, len)| Some((parse_chunk(&rel)?, len)))
            .collect())
    }

    fn protected_manifests(&mut self) -> Result<Vec<Protected>> {
        let s = self.store;
        let now = self.started + self.clock.elapsed().as_micros() as i64;
        let live: BTreeSet<String> =
            s.markers()?.into_iter().filter(|(_, _, t)| now - t < s.grace_us).map(|(vm, _, _)| vm).collect();
        let (_, uncommitted) = s.scan_backups()?;
        let mut out = Vec::new();
        for (vm, manifests) in uncommitted {
            if !live.contains(&vm) {
                continue;
            }
            for (id, disk, _) in manifests {
                let mut buf = Vec::new();
                let key = s.manifest_key(&vm, &id, &disk);
                match s.get(&key, crate::manifest::MAX_MANIFEST_LEN, &mut buf)? {
                    Fetched::Found => out.push(Protected { vm: vm.clone(), id, disk, bytes: buf }),
                    // Removed meanwhile (its writer dropped it): nothing to keep.
                    Fetched::Missing => {}
                    Fetched::TooLong(len) => {
                        return Err(Error::Invalid { key: key.to_string(), reason: format!("it is {len} bytes long") })
                    }
                }
            }
        }
        Ok(out)
    }

    fn may_remove(&self) -> bool {
        self.clock.elapsed().as_micros() < (self.store.grace_us / 4) as u128
    }
}

impl Drop for S3Gc<'_> {
    fn drop(&mut self) {
        if !self.done {
            self.done = true;
            let body = serde_json::to_vec(&Record::new(true)).unwrap_or_default();
            if let Err(e) = self.store.put(&self.key, &body) {
                tracing::warn!(error = %e, "cannot mark a garbage collection done: writers wait for it to time out");
            }
        }
    }
}

/// What the object store (or the way to it) answered, in one line: object_store's errors
/// repeat their causes in their messages, so the chain is condensed here into the HTTP status
/// and the S3 error code and message, or the innermost cause (a refused connection, a
/// timeout).
#[derive(Debug)]
pub struct Remote {
    pub status: Option<u16>,
    message: String,
}

impl Remote {
    fn of(e: &object_store::Error) -> Remote {
        let top = e.to_string();
        let mut innermost: &dyn std::error::Error = e;
        while let Some(next) = innermost.source() {
            innermost = next;
        }
        let status =
            top.split("status code: ").nth(1).and_then(|rest| rest.get(..3)).and_then(|code| code.parse::<u16>().ok());
        let tag = |name: &str| {
            let open = format!("<{name}>");
            let close = format!("</{name}>");
            let start = top.find(&open)? + open.len();
            let len = top[start..].find(&close)?;
            Some(top[start..start + len].to_owned())
        };
        let answer = match (status, tag("Code"), tag("Message")) {
            (Some(st), Some(code), Some(msg)) => format!("HTTP {st} {code}: {msg}"),
            (Some(st), _, _) => format!("HTTP {st}"),
            _ => innermost.to_string(),
        };
        let retries = top.split(", after ").nth(1).and_then(|r| r.split(" retries").next());
        let message = match retries {
            Some(n) => format!("{answer} (after {n} retries)"),
            None => answer,
        };
        Remote { status, message }
    }
}

impl fmt::Display for Remote {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Remote {}
