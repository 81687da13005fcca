//! Finding netstatfs mounts in `/proc/self/mountinfo` (pure): each one's
//! mount point, whose it is and whether others may enter it, in the order
//! `findmnt -t fuse.netstatfs` lists them.

/// The file system type netstatfs mounts as (fuse with subtype netstatfs).
const FS_TYPE: &str = "fuse.netstatfs";

/// One netstatfs mount.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetstatfsMount {
    pub path: String,
    /// The uid that mounted it (FUSE's `user_id`).
    pub owner: Option<u32>,
    /// Mounted with allow_other: other users may enter it.
    pub allow_other: bool,
}

impl NetstatfsMount {
    /// Why `uid` may not enter it, if the kernel keeps them out: a FUSE
    /// mount without allow_other is its owner's alone (root's too).
    pub fn closed_to(&self, uid: u32) -> Option<String> {
        let owner = self.owner?;
        (!self.allow_other && owner != uid).then(|| private_to(owner))
    }
}

/// Why a mount of `owner`'s is closed to everyone else.
pub fn private_to(owner: u32) -> String {
    format!("private to uid {owner} (mounted without --allow-other)")
}

/// Every netstatfs mount in `mountinfo`, in the order listed.
pub fn netstatfs_mounts(mountinfo: &str) -> Vec<NetstatfsMount> {
    mountinfo
        .lines()
        .filter_map(|line| {
            // `id parent major:minor root mountpoint options [tags…] - type source superoptions`
            let (before, after) = line.split_once(" - ")?;
            let mut after = after.split(' ');
            let fs_type = after.next()?;
            let options = after.nth(1).unwrap_or("");
            let mount_point = before.split(' ').nth(4)?;
            (fs_type == FS_TYPE).then(|| NetstatfsMount {
                path: unescape(mount_point),
                owner: options
                    .split(',')
                    .find_map(|option| option.strip_prefix("user_id="))
                    .and_then(|uid| uid.parse().ok()),
                allow_other: options.split(',').any(|option| option == "allow_other"),
            })
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
        let mounts = netstatfs_mounts(mountinfo);
        let paths: Vec<&str> = mounts.iter().map(|mount| mount.path.as_str()).collect();
        assert_eq!(paths, ["/run/netstatfs", "/tmp/my mount"]);
        assert!(netstatfs_mounts("garbage line\n\n").is_empty());
        // The first is open to everyone; the second is root's own.
        assert_eq!(mounts[0].closed_to(1000), None);
        assert_eq!(
            mounts[1].closed_to(1000).as_deref(),
            Some("private to uid 0 (mounted without --allow-other)")
        );
        assert_eq!(mounts[1].closed_to(0), None);
    }

    #[test]
    fn a_backslash_without_octal_digits_stays() {
        assert_eq!(unescape("/a\\b\\0"), "/a\\b\\0");
        assert_eq!(unescape("/a\\134b"), "/a\\b");
    }
}
