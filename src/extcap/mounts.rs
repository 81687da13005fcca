//! Finding netstatfs mounts in `/proc/self/mountinfo` (pure): the extcap's
//! default mount point is the first one listed, as `findmnt -t
//! fuse.netstatfs` would show first.

/// The file system type netstatfs mounts as (fuse with subtype netstatfs).
const FS_TYPE: &str = "fuse.netstatfs";

/// Every netstatfs mount point in `mountinfo`, in the order listed.
pub fn netstatfs_mounts(mountinfo: &str) -> Vec<String> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent major:minor root mountpoint options [tags…] - type source superoptions`
            let (before, after) = line.split_once(" - ")?;
            let fs_type = after.split(' ').next()?;
            let mount_point = before.split(' ').nth(4)?;
            (fs_type == FS_TYPE).then(|| unescape(mount_point))
        })
        .collect()
}

/// The kernel writes space, tab, newline and backslash in a mount point as
/// three octal digits after a backslash.
fn unescape(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).filter(|digits| {
            bytes[i] == b'\\' && digits.iter().all(|digit| (b'0'..=b'7').contains(digit))
        });
        match octal {
            Some(digits) => {
                let value = digits
                    .iter()
                    .fold(0u32, |value, digit| value * 8 + u32::from(digit - b'0'));
                out.push(value as u8);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_netstatfs_mounts_in_order_and_unescapes_them() {
        let mountinfo = "\
22 1 0:21 / /proc rw,nosuid shared:5 - proc proc rw
91 22 0:52 / /run/netstatfs ro,nosuid,nodev shared:50 - fuse.netstatfs netstatfs ro,user_id=0,group_id=0,allow_other
95 22 0:53 / /tmp/my\\040mount ro,nosuid - fuse.netstatfs netstatfs ro,user_id=0,group_id=0
96 22 0:54 / /tmp/sshfs rw - fuse.sshfs host: rw
";
        assert_eq!(
            netstatfs_mounts(mountinfo),
            ["/run/netstatfs", "/tmp/my mount"]
        );
        assert!(netstatfs_mounts("garbage line\n\n").is_empty());
    }

    #[test]
    fn a_backslash_without_octal_digits_stays() {
        assert_eq!(unescape("/a\\b\\0"), "/a\\b\\0");
        assert_eq!(unescape("/a\\134b"), "/a\\b");
    }
}
