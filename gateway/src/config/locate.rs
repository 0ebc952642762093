//! Where an error is: the line and column of a byte offset, and the field there as a
//! dotted path such as `routes[1].upstream`.

pub(super) fn line_col(src: &str, offset: usize) -> (usize, usize) {
    let offset = offset.min(src.len());
    let before = &src[..offset];
    let line = before.matches('\n').count() + 1;
    let column = before.rfind('\n').map(|i| offset - i).unwrap_or(offset + 1);
    (line, column)
}

/// Names the field at a byte offset as a dotted path such as `routes[1].upstream` or
/// `upstreams.echo.health.interval`, from the enclosing table header and the key on the line.
pub(super) fn field_at(src: &str, offset: usize) -> String {
    if offset == 0 {
        // Whole-file problems (a required table missing) have no better place.
        return "(top level)".into();
    }
    let offset = offset.min(src.len());
    let line_start = src[..offset].rfind('\n').map(|i| i + 1).unwrap_or(0);
    let line_end = src[offset..]
        .find('\n')
        .map(|i| offset + i)
        .unwrap_or(src.len());
    let line = &src[line_start..line_end];
    let trimmed = line.trim_start();
    let header_of = |l: &str| -> Option<(String, bool)> {
        let l = l.trim();
        if let Some(inner) = l.strip_prefix("[[").and_then(|x| x.split("]]").next()) {
            return Some((inner.trim().to_string(), true));
        }
        if let Some(inner) = l.strip_prefix('[').and_then(|x| x.split(']').next()) {
            return Some((inner.trim().to_string(), false));
        }
        None
    };
    // The table enclosing the offset (the line itself when it is a header).
    let mut table: Option<(String, bool, usize)> = None;
    for (pos, l) in line_starts(src) {
        if pos > line_start {
            break;
        }
        if let Some((name, array)) = header_of(l) {
            table = Some((name, array, pos));
        }
    }
    let table_path = match &table {
        None => String::new(),
        Some((name, array, pos)) if *array => {
            let index = line_starts(src)
                .filter(|(p, l)| *p < *pos && header_of(l).is_some_and(|(n, a)| a && n == *name))
                .count();
            format!("{name}[{index}]")
        }
        Some((name, _, _)) => name.clone(),
    };
    if header_of(trimmed).is_some() || trimmed.is_empty() {
        return if table_path.is_empty() {
            "(top level)".into()
        } else {
            table_path
        };
    }
    let key = trimmed
        .split('=')
        .next()
        .unwrap_or("")
        .trim()
        .trim_matches('"');
    match (table_path.is_empty(), key.is_empty()) {
        (true, _) => key.to_string(),
        (false, true) => table_path,
        (false, false) => format!("{table_path}.{key}"),
    }
}

fn line_starts(src: &str) -> impl Iterator<Item = (usize, &str)> {
    let mut pos = 0;
    src.split('\n').map(move |l| {
        let p = pos;
        pos += l.len() + 1;
        (p, l)
    })
}
