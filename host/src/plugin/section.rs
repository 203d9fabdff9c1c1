//! Reading and appending top-level custom sections of a wasm binary (module
//! or component). Only the outermost sections are walked; nested modules and
//! components are skipped whole by their size.

fn read_leb(bytes: &[u8], pos: &mut usize) -> Option<usize> {
    let mut value: u64 = 0;
    for shift in (0..35).step_by(7) {
        let byte = *bytes.get(*pos)?;
        *pos += 1;
        value |= u64::from(byte & 0x7f) << shift;
        if byte & 0x80 == 0 {
            return usize::try_from(value).ok();
        }
    }
    None
}

fn write_leb(out: &mut Vec<u8>, mut value: usize) {
    loop {
        let byte = (value & 0x7f) as u8;
        value >>= 7;
        if value == 0 {
            out.push(byte);
            return;
        }
        out.push(byte | 0x80);
    }
}

/// The contents of the first top-level custom section called `name`.
pub fn find<'a>(bytes: &'a [u8], name: &str) -> Option<&'a [u8]> {
    let mut pos = 8;
    while pos < bytes.len() {
        let id = bytes[pos];
        pos += 1;
        let size = read_leb(bytes, &mut pos)?;
        let end = pos.checked_add(size)?;
        let body = bytes.get(pos..end)?;
        if id == 0 {
            let mut p = 0;
            let len = read_leb(body, &mut p)?;
            let section_name = body.get(p..p.checked_add(len)?)?;
            if section_name == name.as_bytes() {
                return body.get(p + len..);
            }
        }
        pos = end;
    }
    None
}

/// `bytes` with a custom section `name` holding `data` appended.
pub fn append(bytes: &[u8], name: &str, data: &[u8]) -> Vec<u8> {
    let mut body = Vec::new();
    write_leb(&mut body, name.len());
    body.extend_from_slice(name.as_bytes());
    body.extend_from_slice(data);
    let mut out = bytes.to_vec();
    out.push(0);
    write_leb(&mut out, body.len());
    out.extend_from_slice(&body);
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn append_then_find() {
        let header = b"\0asm\x0d\0\x01\0".to_vec();
        assert_eq!(find(&header, "x"), None);
        let data = vec![7u8; 300];
        let with = append(&header, "orch-manifest", &data);
        let with = append(&with, "other", b"zz");
        assert_eq!(find(&with, "orch-manifest"), Some(&data[..]));
        assert_eq!(find(&with, "other"), Some(&b"zz"[..]));
        assert_eq!(find(&with, "missing"), None);
        // Truncated input is not a panic.
        assert_eq!(find(&with[..with.len() - 1], "other"), None);
    }
}
