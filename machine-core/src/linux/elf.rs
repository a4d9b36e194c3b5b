//! Just enough ELF reading to find a program's shared libraries (`DT_NEEDED`).
//!
//! The guest agent is a dynamically linked Debian binary; the initramfs must carry every
//! library it loads, and the libraries those load. Reading the dynamic section ourselves keeps
//! the build free of `readelf`/`ldd` on the host and tells exactly which library is missing.

/// The `DT_NEEDED` names of a 64-bit little-endian ELF file, or `None` if `data` is not one
/// (or is damaged). A static binary gives an empty list.
pub(crate) fn needed_libraries(data: &[u8]) -> Option<Vec<String>> {
    if data.len() < 64 || &data[..4] != b"\x7fELF" || data[4] != 2 || data[5] != 1 {
        return None;
    }
    // Every offset comes from the file: checked, so a damaged file gives None, not a panic.
    let bytes = |at: usize, n: usize| data.get(at..at.checked_add(n)?);
    let u16_at = |at: usize| -> Option<u64> {
        Some(u16::from_le_bytes(bytes(at, 2)?.try_into().ok()?) as u64)
    };
    let u32_at = |at: usize| -> Option<u64> {
        Some(u32::from_le_bytes(bytes(at, 4)?.try_into().ok()?) as u64)
    };
    let u64_at =
        |at: usize| -> Option<u64> { Some(u64::from_le_bytes(bytes(at, 8)?.try_into().ok()?)) };
    let ph_off = u64_at(0x20)? as usize;
    let ph_size = u16_at(0x36)? as usize;
    let ph_count = u16_at(0x38)? as usize;
    const PT_LOAD: u64 = 1;
    const PT_DYNAMIC: u64 = 2;
    // Program headers: the loadable segments map addresses to file offsets, and the dynamic
    // segment holds the NEEDED entries (offsets into the string table, found by address).
    let mut loads = Vec::new();
    let mut dynamic: Option<(usize, usize)> = None;
    for i in 0..ph_count {
        let at = ph_off.checked_add(i.checked_mul(ph_size)?)?;
        let kind = u32_at(at)?;
        let offset = u64_at(at.checked_add(8)?)?;
        let vaddr = u64_at(at.checked_add(16)?)?;
        let filesz = u64_at(at.checked_add(32)?)?;
        match kind {
            PT_LOAD => loads.push((vaddr, offset, filesz)),
            PT_DYNAMIC => dynamic = Some((offset as usize, filesz as usize)),
            _ => {}
        }
    }
    let Some((dyn_off, dyn_size)) = dynamic else {
        return Some(Vec::new());
    };
    const DT_NULL: u64 = 0;
    const DT_NEEDED: u64 = 1;
    const DT_STRTAB: u64 = 5;
    let mut needed = Vec::new();
    let mut strtab_addr = None;
    for i in 0..dyn_size / 16 {
        let at = dyn_off.checked_add(i * 16)?;
        let tag = u64_at(at)?;
        let value = u64_at(at.checked_add(8)?)?;
        match tag {
            DT_NULL => break,
            DT_NEEDED => needed.push(value),
            DT_STRTAB => strtab_addr = Some(value),
            _ => {}
        }
    }
    let strtab_addr = strtab_addr?;
    let strtab = loads.iter().find_map(|&(vaddr, offset, filesz)| {
        (strtab_addr >= vaddr && strtab_addr - vaddr < filesz)
            .then(|| (strtab_addr - vaddr).checked_add(offset))
            .flatten()
            .map(|at| at as usize)
    })?;
    needed
        .into_iter()
        .map(|name_off| {
            let start = strtab.checked_add(name_off as usize)?;
            let rest = data.get(start..)?;
            let end = rest.iter().position(|&b| b == 0)?;
            String::from_utf8(rest[..end].to_vec()).ok()
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_elf_is_none() {
        assert_eq!(needed_libraries(b"#!/bin/sh\necho hi\n"), None);
        assert_eq!(needed_libraries(&[0x7f, b'E', b'L', b'F']), None);
        let mut truncated = b"\x7fELF\x02\x01".to_vec();
        truncated.resize(64, 0xff);
        assert_eq!(needed_libraries(&truncated), None);
    }

    #[test]
    fn reads_the_needed_libraries_of_a_host_binary() {
        // The test binary itself is a dynamically linked 64-bit ELF that needs libc.
        let exe = std::fs::read("/proc/self/exe").expect("read own executable");
        let needed = needed_libraries(&exe).expect("own executable is ELF");
        assert!(
            needed.iter().any(|n| n.starts_with("libc.so")),
            "needed: {needed:?}"
        );
    }
}
