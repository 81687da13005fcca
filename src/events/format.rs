//! A tracepoint's record layout, from its tracefs `format` file (pure).
//!
//! Field offsets and sizes differ between kernels, so they are read at run
//! time, never written down here: a field this kernel lacks makes the event
//! unusable (the caller falls back), a field of another size is refused.

use std::collections::HashMap;

/// Where one field sits in a raw tracepoint record.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Field {
    pub offset: usize,
    pub size: usize,
}

/// The fields of one tracepoint, by name.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Layout {
    fields: HashMap<String, Field>,
}

impl Layout {
    /// Parses a `format` file: lines like
    /// `field:__u16 sport; offset:24; size:2; signed:0;` (tab-separated).
    /// Lines that are not
    /// fields (name, ID, print fmt) are skipped.
    pub fn parse(text: &str) -> Layout {
        let mut fields = HashMap::new();
        for line in text.lines() {
            let Some(rest) = line.trim().strip_prefix("field:") else {
                continue;
            };
            let mut parts = rest.split(';').map(str::trim);
            let Some(declaration) = parts.next() else {
                continue;
            };
            let mut offset = None;
            let mut size = None;
            for part in parts {
                if let Some(value) = part.strip_prefix("offset:") {
                    offset = value.parse().ok();
                } else if let Some(value) = part.strip_prefix("size:") {
                    size = value.parse().ok();
                }
            }
            let (Some(offset), Some(size), Some(name)) = (offset, size, field_name(declaration))
            else {
                continue;
            };
            fields.insert(name.to_owned(), Field { offset, size });
        }
        Layout { fields }
    }

    /// The field `name`, if this kernel's event has it with size `size`.
    pub fn field(&self, name: &str, size: usize) -> Result<Field, String> {
        match self.fields.get(name) {
            Some(field) if field.size == size => Ok(*field),
            Some(field) => Err(format!("field {name} is {} bytes, not {size}", field.size)),
            None => Err(format!("no field {name}")),
        }
    }
}

/// `__u8 saddr[4]` → `saddr`; `const void * skaddr` → `skaddr`;
/// `__data_loc char[] name` → `name`.
fn field_name(declaration: &str) -> Option<&str> {
    let last = declaration.split_whitespace().last()?;
    let name = last.split('[').next()?.trim_start_matches('*');
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The format of sock:inet_sock_set_state as kernel 6.18 writes it.
    const SET_STATE: &str = "name: inet_sock_set_state
ID: 2287
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:const void * skaddr;\toffset:8;\tsize:8;\tsigned:0;
\tfield:int oldstate;\toffset:16;\tsize:4;\tsigned:1;
\tfield:__u16 sport;\toffset:24;\tsize:2;\tsigned:0;
\tfield:__u8 saddr[4];\toffset:32;\tsize:4;\tsigned:0;
\tfield:__data_loc char[] parent_comm;\toffset:8;\tsize:4;\tsigned:0;

print fmt: \"family=%s\", REC->family
";

    #[test]
    fn reads_offsets_and_sizes_by_name() {
        let layout = Layout::parse(SET_STATE);
        assert_eq!(layout.field("skaddr", 8), Ok(Field { offset: 8, size: 8 }));
        assert_eq!(
            layout.field("saddr", 4),
            Ok(Field {
                offset: 32,
                size: 4
            })
        );
        assert_eq!(layout.field("common_flags", 1).unwrap().offset, 2);
        assert_eq!(layout.field("parent_comm", 4).unwrap().offset, 8);
        assert!(layout.field("sport", 4).is_err(), "another size");
        assert!(layout.field("daddr", 4).is_err(), "missing");
    }

    #[test]
    fn garbage_gives_an_empty_layout() {
        for text in [
            "",
            "field:",
            "field:int x;\toffset:;\tsize:4;",
            "\u{0}\u{1}",
        ] {
            assert!(Layout::parse(text).field("x", 4).is_err());
        }
    }
}
