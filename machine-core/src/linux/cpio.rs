//! The initramfs archive: the kernel's "newc" cpio format, written in memory.
//!
//! The kernel unpacks an uncompressed newc archive as well as a compressed one, so no
//! compressor is needed: each entry is a 110-byte ASCII header, the NUL-terminated name and the
//! data, both padded to 4 bytes, and the archive ends with a `TRAILER!!!` entry.

/// An initramfs being assembled. Entries are written in the order they are added; a parent
/// directory must be added before what it holds.
#[derive(Debug, Default)]
pub(crate) struct Archive {
    bytes: Vec<u8>,
    next_inode: u32,
}

const S_IFDIR: u32 = 0o040_000;
const S_IFREG: u32 = 0o100_000;
const S_IFLNK: u32 = 0o120_000;

impl Archive {
    /// A directory with mode 0755.
    pub(crate) fn dir(&mut self, path: &str) {
        self.entry(path, S_IFDIR | 0o755, &[]);
    }

    /// A regular file with `mode` (permission bits).
    pub(crate) fn file(&mut self, path: &str, mode: u32, data: &[u8]) {
        self.entry(path, S_IFREG | (mode & 0o7777), data);
    }

    /// A symbolic link at `path` pointing to `target`.
    pub(crate) fn symlink(&mut self, path: &str, target: &str) {
        self.entry(path, S_IFLNK | 0o777, target.as_bytes());
    }

    /// Ends the archive and returns its bytes.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, &[]);
        self.bytes
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8]) {
        // Names are stored without a leading slash, as `find . | cpio` would (minus the dot).
        let name = path.trim_start_matches('/');
        self.next_inode += 1;
        let is_dir = mode & 0o170_000 == S_IFDIR;
        let fields: [u32; 13] = [
            self.next_inode,
            mode,
            0, // uid
            0, // gid
            if is_dir { 2 } else { 1 },
            0, // mtime: fixed, so equal inputs give equal archives
            data.len() as u32,
            0, // dev major
            0, // dev minor
            0, // rdev major
            0, // rdev minor
            name.len() as u32 + 1,
            0, // check (unused by newc)
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08x}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while self.bytes.len() % 4 != 0 {
            self.bytes.push(0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_are_newc_headers_padded_to_four_bytes() {
        let mut archive = Archive::default();
        archive.dir("/bin");
        archive.file("/bin/x", 0o755, b"hello");
        archive.symlink("/sh", "bin/x");
        let bytes = archive.finish();
        assert_eq!(bytes.len() % 4, 0);
        // First header: inode 1, a directory, name "bin" (4 bytes with its NUL).
        assert_eq!(&bytes[..6], b"070701");
        assert_eq!(&bytes[6..14], b"00000001");
        assert_eq!(&bytes[14..22], b"000041ed");
        assert_eq!(&bytes[94..102], b"00000004");
        assert_eq!(&bytes[110..114], b"bin\0");
        // The file's data follows its name, padded.
        let file_at = 116;
        assert_eq!(&bytes[file_at..file_at + 6], b"070701");
        assert_eq!(&bytes[file_at + 14..file_at + 22], b"000081ed");
        assert_eq!(&bytes[file_at + 54..file_at + 62], b"00000005");
        let name_end = file_at + 110 + 6; // "bin/x\0"
        assert_eq!(&bytes[name_end..name_end + 5], b"hello");
        assert!(bytes
            .windows(b"TRAILER!!!".len())
            .any(|w| w == b"TRAILER!!!"));
    }
}
