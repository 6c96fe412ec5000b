//! Client-side encryption, keyed per tenant (docs/repository.md, "Encryption").
//!
//! A tenant's [`DataKey`] (32 random bytes) never leaves the host in the clear: its key file
//! holds it wrapped (AES-256-GCM) by a key-encryption key, the [`Kek`]; rewrapping under a new
//! KEK rewrites the key file and nothing in the repository. From the data key, HKDF-SHA-256
//! derives the key that seals chunks and manifest metadata (AES-256-GCM, a random 96-bit nonce
//! each time), the key that names chunks (HMAC-SHA-256 of the plaintext, so equal chunks of one
//! tenant share a name and a store learns nothing else from names, and tenants never share
//! one), the key that authenticates a manifest's chunk table, and the key's public id
//! ([`KeyId`], which names it in errors and in the repository).
//!
//! Everything here is a pure function of bytes and keys; the formats that hold the results are
//! in `chunk` and `manifest`.

use std::fmt;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use aes_gcm::aead::inout::InOutBuf;
use aes_gcm::{AeadInOut, Aes256Gcm, KeyInit};
use hkdf::Hkdf;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use zeroize::Zeroizing;

use crate::hash::ChunkHash;

/// Bytes of a nonce (AES-GCM's 96 bits).
pub const NONCE_LEN: usize = 12;
/// Bytes of an authentication tag.
pub const TAG_LEN: usize = 16;
/// Bytes of a key id.
pub const KEY_ID_LEN: usize = 8;
const SECRET_LEN: usize = 32;
const HKDF_SALT: &[u8] = b"livesnap data key v1";
const KEK_SALT: &[u8] = b"livesnap kek v1";

const KEY_FILE_MAGIC: &[u8; 8] = b"LSNAPKEY";
const KEY_FILE_VERSION: u16 = 1;
/// The key file's header: everything before the wrapped key, all of it authenticated.
const KEY_FILE_HEADER_LEN: usize = 48;
/// Bytes of a key file.
pub const KEY_FILE_LEN: usize = KEY_FILE_HEADER_LEN + SECRET_LEN + TAG_LEN;
/// A KEK file: 64 hex digits and an optional newline, nothing else.
const KEK_FILE_MAX_LEN: u64 = 128;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("Cannot read the key file `{}`", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("Cannot write the key file `{}`", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("The key file `{}` can be read or written by others (mode {mode:04o}): it must be mode 0600 or 0400", path.display())]
    Mode { path: PathBuf, mode: u32 },
    #[error("The key file `{}` is not a key file: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error("The key file `{}` is wrapped by KEK {wrapped_by}, not by the KEK `{}` (KEK {kek})", path.display(), kek_path.display())]
    OtherKek { path: PathBuf, wrapped_by: KeyId, kek_path: PathBuf, kek: KeyId },
    #[error("The key file `{}` (key {key}) does not open under its KEK {kek}: it was altered", path.display())]
    Unwrap { path: PathBuf, key: KeyId, kek: KeyId },
    #[error("The system's random number generator failed")]
    Random(#[source] getrandom::Error),
}

pub type Result<T> = std::result::Result<T, Error>;

/// The public name of a key: 8 bytes derived from it (HKDF), shown as 16 hex digits. Equal ids
/// mean equal keys, short of a forgery that would also have to pass every authentication.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(pub [u8; KEY_ID_LEN]);

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyId({self})")
    }
}

impl FromStr for KeyId {
    type Err = ();

    fn from_str(s: &str) -> std::result::Result<Self, ()> {
        let mut out = [0u8; KEY_ID_LEN];
        hex_decode(s.trim(), &mut out).ok_or(())?;
        Ok(KeyId(out))
    }
}

impl serde::Serialize for KeyId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// A tenant's data key, with the keys derived from it. Its secret bytes are never shown
/// (`Debug` prints the id and where it came from) and are wiped when dropped.
pub struct DataKey {
    id: KeyId,
    /// Where the key came from (its key file), for messages.
    origin: String,
    seal: Aes256Gcm,
    names: Hmac<Sha256>,
    tables: Hmac<Sha256>,
    /// The secret, kept to wrap it again.
    secret: Zeroizing<[u8; SECRET_LEN]>,
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DataKey").field("id", &self.id).field("origin", &self.origin).finish_non_exhaustive()
    }
}

/// The failure of an authenticated decryption: the bytes were altered, or are not what their
/// name and place say, or were sealed under another key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Unauthentic;

impl DataKey {
    /// A new random data key.
    pub fn generate(origin: impl Into<String>) -> Result<DataKey> {
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        getrandom::fill(&mut secret[..]).map_err(Error::Random)?;
        Ok(DataKey::from_secret(&secret, origin))
    }

    /// The data key of these secret bytes (tests and key files).
    pub fn from_secret(secret: &[u8; SECRET_LEN], origin: impl Into<String>) -> DataKey {
        let hk = Hkdf::<Sha256>::new(Some(HKDF_SALT), secret);
        let derive = |info: &[u8]| {
            let mut k = Zeroizing::new([0u8; 32]);
            // 32 bytes is far below HKDF-SHA-256's limit of 8160.
            if hk.expand(info, &mut k[..]).is_err() {
                unreachable!("HKDF expands 32 bytes");
            }
            k
        };
        let seal_key = derive(b"seal: chunks and manifests (AES-256-GCM)");
        let name_key = derive(b"chunk names (HMAC-SHA-256)");
        let table_key = derive(b"manifest chunk tables (HMAC-SHA-256)");
        let id_bytes = derive(b"key id");
        let mut id = [0u8; KEY_ID_LEN];
        id.copy_from_slice(&id_bytes[..KEY_ID_LEN]);
        let seal = Aes256Gcm::new((&*seal_key).into());
        let mac = |k: &[u8]| match Hmac::<Sha256>::new_from_slice(k) {
            Ok(m) => m,
            Err(_) => unreachable!("HMAC takes a key of any length"),
        };
        DataKey {
            id: KeyId(id),
            origin: origin.into(),
            seal,
            names: mac(&name_key[..]),
            tables: mac(&table_key[..]),
            secret: Zeroizing::new(*secret),
        }
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    /// Where the key came from (its key file), for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    /// The name of a chunk of these bytes under this key: HMAC-SHA-256.
    pub fn chunk_name(&self, data: &[u8]) -> ChunkHash {
        let mut m = self.names.clone();
        m.update(data);
        ChunkHash(m.finalize().into_bytes().into())
    }

    /// The MAC of a manifest's chunk table and everything before it.
    pub(crate) fn table_mac(&self, parts: &[&[u8]]) -> [u8; 32] {
        let mut m = self.tables.clone();
        for p in parts {
            m.update(p);
        }
        m.finalize().into_bytes().into()
    }

    /// Checks a table MAC in constant time.
    pub(crate) fn check_table_mac(&self, parts: &[&[u8]], tag: &[u8]) -> std::result::Result<(), Unauthentic> {
        let mut m = self.tables.clone();
        for p in parts {
            m.update(p);
        }
        m.verify_slice(tag).map_err(|_| Unauthentic)
    }

    /// Encrypts `buf` in place under `nonce` (from [`random_nonce`]) with `aad`; returns the tag.
    pub(crate) fn seal(&self, nonce: &[u8; NONCE_LEN], aad: &[u8], buf: &mut [u8]) -> [u8; TAG_LEN] {
        match self.seal.encrypt_inout_detached(&(*nonce).into(), aad, InOutBuf::from(buf)) {
            Ok(tag) => tag.into(),
            // AES-GCM refuses only messages over 64 GiB; chunks and manifests are far smaller.
            Err(_) => unreachable!("AES-GCM seals up to 64 GiB"),
        }
    }

    /// Decrypts `buf` in place; on failure `buf` holds nothing usable.
    pub(crate) fn open(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        buf: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> std::result::Result<(), Unauthentic> {
        self.seal.decrypt_inout_detached(&(*nonce).into(), aad, InOutBuf::from(&mut *buf), &(*tag).into()).map_err(
            |_| {
                buf.fill(0);
                Unauthentic
            },
        )
    }
}

/// A fresh random nonce.
pub(crate) fn random_nonce() -> std::result::Result<[u8; NONCE_LEN], getrandom::Error> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n)?;
    Ok(n)
}

/// A key-encryption key: wraps data keys in key files. A file of 64 hex digits (mode 0600).
pub struct Kek {
    id: KeyId,
    path: PathBuf,
    cipher: Aes256Gcm,
}

impl fmt::Debug for Kek {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Kek").field("id", &self.id).field("path", &self.path).finish_non_exhaustive()
    }
}

impl Kek {
    pub(crate) fn from_secret(secret: &[u8; SECRET_LEN], path: &Path) -> Kek {
        let hk = Hkdf::<Sha256>::new(Some(KEK_SALT), secret);
        let mut wrap = Zeroizing::new([0u8; 32]);
        let mut id = [0u8; KEY_ID_LEN];
        if hk.expand(b"wrap data keys (AES-256-GCM)", &mut wrap[..]).is_err() || hk.expand(b"kek id", &mut id).is_err()
        {
            unreachable!("HKDF expands 32 bytes");
        }
        Kek { id: KeyId(id), path: path.to_owned(), cipher: Aes256Gcm::new((&*wrap).into()) }
    }

    /// Makes a new KEK file at `path` (which must not exist), mode 0600.
    pub fn create(path: &Path) -> Result<Kek> {
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        getrandom::fill(&mut secret[..]).map_err(Error::Random)?;
        let mut text = Zeroizing::new(String::with_capacity(2 * SECRET_LEN + 1));
        for b in secret.iter() {
            text.push_str(&format!("{b:02x}"));
        }
        text.push('\n');
        write_new(path, text.as_bytes())?;
        Ok(Kek::from_secret(&secret, path))
    }

    /// Reads a KEK file: mode 0600 (or stricter), 64 hex digits.
    pub fn load(path: &Path) -> Result<Kek> {
        let bytes = read_private(path, KEK_FILE_MAX_LEN)?;
        let text = std::str::from_utf8(&bytes).map_err(|_| format_error(path, "it is not text"))?;
        let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
        hex_decode(text.trim_end_matches('\n'), &mut secret[..])
            .ok_or_else(|| format_error(path, "a KEK file holds 64 hex digits"))?;
        Ok(Kek::from_secret(&secret, path))
    }

    pub fn id(&self) -> KeyId {
        self.id
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// What a key file says without opening it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct KeyFileInfo {
    pub key: KeyId,
    pub kek: KeyId,
    pub created_unix_s: u64,
}

/// Makes a new data key and writes it, wrapped by `kek`, to `path` (which must not exist),
/// mode 0600.
pub fn create_key_file(path: &Path, kek: &Kek) -> Result<DataKey> {
    let key = DataKey::generate(path.display().to_string())?;
    let created = crate::now_unix_us() / 1_000_000;
    let file = wrap(&key, kek, created)?;
    write_new(path, &file)?;
    Ok(key)
}

/// Reads the key file at `path` and unwraps its data key with `kek`.
pub fn load_key_file(path: &Path, kek: &Kek) -> Result<DataKey> {
    let bytes = read_private(path, KEY_FILE_LEN as u64 + 1)?;
    open_key_file(&bytes, path, kek)
}

/// Reads the header of the key file at `path` (no KEK needed).
pub fn key_file_info(path: &Path) -> Result<KeyFileInfo> {
    let bytes = read_private(path, KEY_FILE_LEN as u64 + 1)?;
    parse_key_file(&bytes).map_err(|r| format_error(path, &r))
}

/// Wraps the data key of the key file at `path` (wrapped by `old`) by `new` instead, and
/// replaces the file (a new file renamed over it). The data key, and so everything in the
/// repository, stays as it is.
pub fn rewrap_key_file(path: &Path, old: &Kek, new: &Kek) -> Result<KeyFileInfo> {
    let bytes = read_private(path, KEY_FILE_LEN as u64 + 1)?;
    let info = parse_key_file(&bytes).map_err(|r| format_error(path, &r))?;
    let key = open_key_file(&bytes, path, old)?;
    let file = wrap(&key, new, info.created_unix_s)?;
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let tmp = path.with_file_name(format!(".{name}.rewrap-{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    write_new(&tmp, &file)?;
    std::fs::rename(&tmp, path).map_err(|source| {
        let _ = std::fs::remove_file(&tmp);
        Error::Write { path: path.to_owned(), source }
    })?;
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|source| Error::Write { path: path.to_owned(), source })?;
    }
    Ok(KeyFileInfo { key: info.key, kek: new.id, created_unix_s: info.created_unix_s })
}

/// The key file image of `key` wrapped by `kek` (layout in docs/repository.md).
pub(crate) fn wrap(key: &DataKey, kek: &Kek, created_unix_s: u64) -> Result<Vec<u8>> {
    let nonce = random_nonce().map_err(Error::Random)?;
    let mut out = Vec::with_capacity(KEY_FILE_LEN);
    out.extend_from_slice(KEY_FILE_MAGIC);
    out.extend_from_slice(&KEY_FILE_VERSION.to_le_bytes());
    out.extend_from_slice(&[0, 0]);
    out.extend_from_slice(&key.id.0);
    out.extend_from_slice(&kek.id.0);
    out.extend_from_slice(&created_unix_s.to_le_bytes());
    out.extend_from_slice(&nonce);
    debug_assert_eq!(out.len(), KEY_FILE_HEADER_LEN);
    let mut body = Zeroizing::new(*key.secret);
    let tag = match kek.cipher.encrypt_inout_detached(&nonce.into(), &out, InOutBuf::from(&mut body[..])) {
        Ok(t) => t,
        Err(_) => unreachable!("AES-GCM seals 32 bytes"),
    };
    out.extend_from_slice(&body[..]);
    out.extend_from_slice(&tag);
    Ok(out)
}

/// Checks a key file image's header.
pub fn parse_key_file(bytes: &[u8]) -> std::result::Result<KeyFileInfo, String> {
    if bytes.len() != KEY_FILE_LEN {
        return Err(format!("it is {} bytes long, not {KEY_FILE_LEN}", bytes.len()));
    }
    if &bytes[0..8] != KEY_FILE_MAGIC {
        return Err("its magic number is not LSNAPKEY".into());
    }
    let version = u16::from_le_bytes([bytes[8], bytes[9]]);
    if version != KEY_FILE_VERSION {
        return Err(format!("its version {version} is not supported"));
    }
    if bytes[10..12] != [0, 0] {
        return Err("its reserved bytes are not zero".into());
    }
    let id = |at: usize| {
        let mut k = [0u8; KEY_ID_LEN];
        k.copy_from_slice(&bytes[at..at + KEY_ID_LEN]);
        KeyId(k)
    };
    let mut created = [0u8; 8];
    created.copy_from_slice(&bytes[28..36]);
    Ok(KeyFileInfo { key: id(12), kek: id(20), created_unix_s: u64::from_le_bytes(created) })
}

/// Unwraps a key file image with `kek`; `path` names it in errors.
pub fn open_key_file(bytes: &[u8], path: &Path, kek: &Kek) -> Result<DataKey> {
    let info = parse_key_file(bytes).map_err(|r| format_error(path, &r))?;
    if info.kek != kek.id {
        return Err(Error::OtherKek {
            path: path.to_owned(),
            wrapped_by: info.kek,
            kek_path: kek.path.clone(),
            kek: kek.id,
        });
    }
    let unwrap_failed = || Error::Unwrap { path: path.to_owned(), key: info.key, kek: kek.id };
    let (header, rest) = bytes.split_at(KEY_FILE_HEADER_LEN);
    let mut nonce = [0u8; NONCE_LEN];
    nonce.copy_from_slice(&header[36..48]);
    let mut secret = Zeroizing::new([0u8; SECRET_LEN]);
    secret.copy_from_slice(&rest[..SECRET_LEN]);
    let mut tag = [0u8; TAG_LEN];
    tag.copy_from_slice(&rest[SECRET_LEN..]);
    kek.cipher
        .decrypt_inout_detached(&nonce.into(), header, InOutBuf::from(&mut secret[..]), &tag.into())
        .map_err(|_| unwrap_failed())?;
    let key = DataKey::from_secret(&secret, path.display().to_string());
    if key.id != info.key {
        return Err(unwrap_failed());
    }
    Ok(key)
}

fn format_error(path: &Path, reason: &str) -> Error {
    Error::Format { path: path.to_owned(), reason: reason.to_owned() }
}

/// Reads a secret file of at most `max` bytes that only its owner may read or write.
fn read_private(path: &Path, max: u64) -> Result<Zeroizing<Vec<u8>>> {
    let read = |source| Error::Read { path: path.to_owned(), source };
    let file = std::fs::File::open(path).map_err(read)?;
    let meta = file.metadata().map_err(read)?;
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        return Err(Error::Mode { path: path.to_owned(), mode });
    }
    if !meta.is_file() {
        return Err(format_error(path, "it is not a regular file"));
    }
    let mut buf = Zeroizing::new(Vec::new());
    std::io::Read::read_to_end(&mut std::io::Read::take(file, max + 1), &mut buf).map_err(read)?;
    if buf.len() as u64 > max {
        return Err(format_error(path, &format!("it is longer than {max} bytes")));
    }
    Ok(buf)
}

/// Writes a new file, mode 0600, durably; fails if it exists.
fn write_new(path: &Path, data: &[u8]) -> Result<()> {
    let write = |source| Error::Write { path: path.to_owned(), source };
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(path).map_err(write)?;
    f.write_all(data).and_then(|()| f.sync_all()).map_err(|e| {
        let _ = std::fs::remove_file(path);
        write(e)
    })
}

fn hex_decode(s: &str, out: &mut [u8]) -> Option<()> {
    let s = s.as_bytes();
    if s.len() != 2 * out.len() {
        return None;
    }
    let digit = |c: u8| match c {
        b'0'..=b'9' => Some(c - b'0'),
        b'a'..=b'f' => Some(c - b'a' + 10),
        b'A'..=b'F' => Some(c - b'A' + 10),
        _ => None,
    };
    for (o, pair) in out.iter_mut().zip(s.chunks_exact(2)) {
        *o = digit(pair[0])? << 4 | digit(pair[1])?;
    }
    Some(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn chmod(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_key_file_opens_under_its_kek_and_after_a_rewrap_under_the_new_one_only() {
        let dir = tempfile::tempdir().unwrap();
        let (kek1, kek2) =
            (Kek::create(&dir.path().join("kek1")).unwrap(), Kek::create(&dir.path().join("kek2")).unwrap());
        assert_ne!(kek1.id(), kek2.id());
        let path = dir.path().join("t.key");
        let key = create_key_file(&path, &kek1).unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let again = load_key_file(&path, &Kek::load(&dir.path().join("kek1")).unwrap()).unwrap();
        assert_eq!(again.id(), key.id());
        assert_eq!(again.chunk_name(b"x"), key.chunk_name(b"x"));
        let e = load_key_file(&path, &kek2).unwrap_err();
        assert!(matches!(e, Error::OtherKek { .. }), "{e}");

        let before = std::fs::read(&path).unwrap();
        let info = rewrap_key_file(&path, &kek1, &kek2).unwrap();
        assert_eq!((info.key, info.kek), (key.id(), kek2.id()));
        assert_ne!(std::fs::read(&path).unwrap(), before);
        let rewrapped = load_key_file(&path, &kek2).unwrap();
        assert_eq!(rewrapped.chunk_name(b"x"), key.chunk_name(b"x"), "the data key is unchanged");
        assert!(matches!(load_key_file(&path, &kek1), Err(Error::OtherKek { .. })));
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        assert!(create_key_file(&path, &kek1).is_err(), "an existing key file is never overwritten");
    }

    #[test]
    fn a_key_file_readable_by_others_or_altered_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let kek = Kek::create(&dir.path().join("kek")).unwrap();
        let path = dir.path().join("t.key");
        create_key_file(&path, &kek).unwrap();
        chmod(&path, 0o640);
        let e = load_key_file(&path, &kek).unwrap_err();
        assert!(matches!(e, Error::Mode { mode: 0o640, .. }), "{e}");
        assert!(e.to_string().contains("t.key"), "{e}");
        chmod(&path, 0o600);
        chmod(&dir.path().join("kek"), 0o644);
        assert!(matches!(Kek::load(&dir.path().join("kek")), Err(Error::Mode { .. })));

        let good = std::fs::read(&path).unwrap();
        // Every byte of the wrapped key, its nonce, tag, ids and time is authenticated.
        for at in [12, 20, 30, 40, 50, KEY_FILE_LEN - 1] {
            let mut bad = good.clone();
            bad[at] ^= 0x10;
            let e = open_key_file(&bad, &path, &kek).unwrap_err();
            assert!(matches!(e, Error::Unwrap { .. } | Error::OtherKek { .. }), "byte {at}: {e}");
        }
        for bad in [&good[..10], &good[..KEY_FILE_LEN - 1], b"LSNAPKEX".as_slice()] {
            assert!(matches!(open_key_file(bad, &path, &kek), Err(Error::Format { .. })));
        }
    }

    #[test]
    fn chunk_names_are_keyed_and_seals_are_bound_to_nonce_and_aad() {
        let a = DataKey::from_secret(&[1; 32], "a");
        let b = DataKey::from_secret(&[2; 32], "b");
        assert_ne!(a.id(), b.id());
        assert_ne!(a.chunk_name(b"data"), b.chunk_name(b"data"), "no dedup across keys");
        assert_ne!(a.chunk_name(b"data"), ChunkHash::of(b"data"));
        assert_eq!(a.chunk_name(b"data"), DataKey::from_secret(&[1; 32], "again").chunk_name(b"data"));

        let nonce = random_nonce().unwrap();
        let mut buf = b"secret bytes".to_vec();
        let tag = a.seal(&nonce, b"aad", &mut buf);
        assert_ne!(&buf[..], b"secret bytes");
        let mut wrong = buf.clone();
        assert_eq!(a.open(&nonce, b"other", &mut wrong, &tag), Err(Unauthentic));
        let mut wrong = buf.clone();
        assert_eq!(b.open(&nonce, b"aad", &mut wrong, &tag), Err(Unauthentic));
        a.open(&nonce, b"aad", &mut buf, &tag).unwrap();
        assert_eq!(&buf[..], b"secret bytes");
        assert!(format!("{a:?}").contains(&a.id().to_string()));
        assert_eq!("0102030405060708".parse::<KeyId>(), Ok(KeyId([1, 2, 3, 4, 5, 6, 7, 8])));
    }
}
