//! A spreadsheet export read as batch items, checked whole before anything is sent, and the
//! server's refusals mapped back to the file's lines and columns.
//!
//! The file is CSV with a header row: `phone`, `reference`, and one column per template
//! parameter, named as the template registry names it (`nama`, `nominal`, ...). Excel's exports
//! are taken as they come: a UTF-8 byte order mark, `;` between cells (Excel with Indonesian
//! regional settings), spaces around values, blank rows and empty trailing columns.

use std::{
    collections::{BTreeMap, HashMap},
    fmt,
    path::Path,
};

use kabar::{
    domain::{batch::rules::MAX_BATCH_ID, error::echo},
    notify::check_reference,
    phone,
    templates::check_param_text,
};

pub const PHONE: &str = "phone";
pub const REFERENCE: &str = "reference";

/// The rows of a checked file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sheet {
    /// The template parameter columns, in file order.
    pub params: Vec<String>,
    pub rows: Vec<Row>,
    /// The cell separator found in the header.
    pub delimiter: u8,
}

/// One row: a message of the batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Row {
    /// The line of the file the row starts on (the header is line 1).
    pub line: u64,
    pub phone: String,
    pub reference: String,
    /// Parameter name and value, in column order.
    pub params: Vec<(String, String)>,
}

/// Something wrong with the file, where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub line: Option<u64>,
    pub column: Option<String>,
    pub text: String,
}

impl Problem {
    fn new(line: Option<u64>, column: Option<&str>, text: impl Into<String>) -> Self {
        Problem {
            line,
            column: column.map(str::to_owned),
            text: text.into(),
        }
    }
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match (self.line, &self.column) {
            (Some(line), Some(column)) => write!(f, "line {line}, column {column}: ")?,
            (Some(line), None) => write!(f, "line {line}: ")?,
            (None, Some(column)) => write!(f, "column {column}: ")?,
            (None, None) => {}
        }
        f.write_str(&self.text)
    }
}

/// The cell separator: `,`, or `;` when the header has semicolons and no comma.
pub fn delimiter(text: &str) -> u8 {
    let header = text
        .lines()
        .find(|l| !l.trim().is_empty())
        .unwrap_or_default();
    if !header.contains(',') && header.contains(';') {
        b';'
    } else {
        b','
    }
}

/// Reads and checks a whole file: every problem found, or the rows.
pub fn read(bytes: &[u8]) -> Result<Sheet, Vec<Problem>> {
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    let text = std::str::from_utf8(bytes).map_err(|e| {
        let line = 1 + bytes[..e.valid_up_to()]
            .iter()
            .filter(|b| **b == b'\n')
            .count() as u64;
        vec![Problem::new(
            Some(line),
            None,
            "the file is not UTF-8 text; in Excel, save it as \"CSV UTF-8 (Comma delimited)\"",
        )]
    })?;
    let delimiter = delimiter(text);
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .delimiter(delimiter)
        .trim(csv::Trim::All)
        .from_reader(text.as_bytes());
    // The lines the records start on. (csv's own line count skips blank lines and counts a
    // CRLF as nothing: Excel writes CRLF.)
    let mut lines = LineCounter::new(text);
    let mut records = Vec::new();
    for record in reader.records() {
        match record {
            Ok(r) => {
                let line = r.position().map_or(0, |p| lines.line_at(p.byte()));
                records.push((line, r));
            }
            Err(e) => {
                let line = e.position().map(|p| lines.line_at(p.byte()));
                return Err(vec![Problem::new(line, None, format!("not CSV: {e}"))]);
            }
        }
    }
    let mut records = records.into_iter();
    let Some((header_line, header)) = records.next() else {
        return Err(vec![Problem::new(
            None,
            None,
            "the file is empty; it needs a header row: phone, reference and one column per \
             template parameter",
        )]);
    };
    let rows: Vec<(u64, Vec<String>)> = records
        .map(|(line, r)| (line, r.iter().map(str::to_owned).collect::<Vec<_>>()))
        .filter(|(_, cells)| cells.iter().any(|c| !c.is_empty()))
        .collect();
    let mut problems = Vec::new();

    // The header: which column is what.
    let mut columns: Vec<Option<String>> = Vec::with_capacity(header.len());
    let mut seen: HashMap<String, usize> = HashMap::new();
    for (i, name) in header.iter().enumerate() {
        let name = if name.eq_ignore_ascii_case(PHONE) {
            PHONE
        } else if name.eq_ignore_ascii_case(REFERENCE) {
            REFERENCE
        } else {
            name
        };
        if name.is_empty() {
            // Excel writes a trailing empty column once a cell beyond the table was touched:
            // harmless while nothing is in it.
            if let Some((line, _)) = rows
                .iter()
                .find(|(_, cells)| cells.get(i).is_some_and(|c| !c.is_empty()))
            {
                problems.push(Problem::new(
                    Some(*line),
                    Some(&format!("{}", i + 1)),
                    "has a value, but the column has no name in the header (line \
                     {header_line}); name it after the template parameter it fills",
                ));
            }
            columns.push(None);
            continue;
        }
        if seen.insert(name.to_owned(), i).is_some() {
            problems.push(Problem::new(
                Some(header_line),
                Some(name),
                "appears twice in the header",
            ));
        }
        columns.push(Some(name.to_owned()));
    }
    for required in [PHONE, REFERENCE] {
        if !seen.contains_key(required) {
            problems.push(Problem::new(
                Some(header_line),
                None,
                format!(
                    "the header has no {required} column (found: {}); the header row needs \
                     phone, reference and one column per template parameter",
                    header
                        .iter()
                        .filter(|c| !c.is_empty())
                        .map(echo)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            ));
        }
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    if rows.is_empty() {
        return Err(vec![Problem::new(
            None,
            None,
            "the file has a header but no rows",
        )]);
    }
    let params: Vec<String> = columns
        .iter()
        .flatten()
        .filter(|c| *c != PHONE && *c != REFERENCE)
        .cloned()
        .collect();

    // The rows.
    let mut first_line: HashMap<String, u64> = HashMap::with_capacity(rows.len());
    let mut out = Vec::with_capacity(rows.len());
    for (line, cells) in rows {
        let line = Some(line).filter(|l| *l > 0);
        if cells.len() > columns.len() && cells[columns.len()..].iter().any(|c| !c.is_empty()) {
            problems.push(Problem::new(
                line,
                None,
                format!(
                    "has {} cells, the header {}; a value with a {} in it needs quotes",
                    cells.len(),
                    columns.len(),
                    delimiter as char
                ),
            ));
            continue;
        }
        let cell = |i: usize| cells.get(i).map_or("", String::as_str);
        let mut row = Row {
            line: line.unwrap_or(0),
            phone: String::new(),
            reference: String::new(),
            params: Vec::with_capacity(params.len()),
        };
        for (i, column) in columns.iter().enumerate() {
            let Some(column) = column.as_deref() else {
                continue;
            };
            let value = cell(i);
            let problem = match column {
                PHONE => {
                    row.phone = value.to_owned();
                    check_phone(value)
                }
                REFERENCE => {
                    row.reference = value.to_owned();
                    if value.is_empty() {
                        Err(
                            "is empty; each row needs its own reference (the invoice number)"
                                .to_owned(),
                        )
                    } else if let Err(problem) = check_reference(value) {
                        Err(problem)
                    } else if let Some(first) = first_line.get(value) {
                        Err(format!(
                            "{} repeats the reference of line {first}; each reference is sent \
                             once per batch",
                            echo(value)
                        ))
                    } else {
                        first_line.insert(value.to_owned(), row.line);
                        Ok(())
                    }
                }
                name => {
                    row.params.push((name.to_owned(), value.to_owned()));
                    check_param_text(value)
                }
            };
            if let Err(text) = problem {
                problems.push(Problem::new(line, Some(column), text));
            }
        }
        out.push(row);
    }
    if problems.is_empty() {
        Ok(Sheet {
            params,
            rows: out,
            delimiter,
        })
    } else {
        Err(problems)
    }
}

/// Line numbers of byte offsets, counted forward (the offsets come in order).
struct LineCounter<'a> {
    bytes: &'a [u8],
    at: usize,
    line: u64,
}

impl<'a> LineCounter<'a> {
    fn new(text: &'a str) -> Self {
        LineCounter {
            bytes: text.as_bytes(),
            at: 0,
            line: 1,
        }
    }

    /// The line of the record csv places at `byte`: csv gives where it started reading, before
    /// the line ends (and blank lines) ahead of the record.
    fn line_at(&mut self, byte: u64) -> u64 {
        let mut start = usize::try_from(byte).map_or(self.bytes.len(), |b| b.min(self.bytes.len()));
        while start < self.bytes.len() && matches!(self.bytes[start], b'\r' | b'\n') {
            start += 1;
        }
        if start > self.at {
            self.line += self.bytes[self.at..start]
                .iter()
                .filter(|b| **b == b'\n')
                .count() as u64;
            self.at = start;
        }
        self.line
    }
}

/// A phone cell as kabar will check it, with a hint for what Excel does to numbers.
fn check_phone(value: &str) -> Result<(), String> {
    if value.is_empty() {
        return Err("is empty".to_owned());
    }
    phone::normalize(value).map(drop).map_err(|e| {
        let mut text = format!("{}: {e}", echo(value));
        if value.contains(['E', 'e']) && value.contains('+') {
            text.push_str(
                "; Excel turned the number into a formula-style number: format the column as \
                 Text and type the numbers again",
            );
        }
        text
    })
}

/// A batch id from a file name: its stem with every run of other characters than
/// `A-Z a-z 0-9 . _ : -` made one `-`, at most [`MAX_BATCH_ID`] characters; `None` if nothing
/// is left.
pub fn batch_id_from_path(path: &Path) -> Option<String> {
    let stem = path.file_stem()?.to_string_lossy();
    let mut id = String::with_capacity(stem.len());
    let mut replaced = false;
    for c in stem.chars() {
        if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | ':' | '-') {
            id.push(c);
            replaced = false;
        } else if !replaced {
            id.push('-');
            replaced = true;
        }
    }
    id.truncate(MAX_BATCH_ID);
    let id = id.trim_matches('-');
    (!id.is_empty()).then(|| id.to_owned())
}

/// Where a field the server named (`messages[3].params[nama]`) is in the file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Place {
    /// None when the problem is the same for every row (the template, a missing column).
    line: Option<u64>,
    /// `column phone`, `--template`, or the field as the server named it.
    what: String,
}

fn place(field: &str, lines: &[u64], columns: &[String]) -> Place {
    let whole = |what: &str| Place {
        line: None,
        what: what.to_owned(),
    };
    let Some(rest) = field.strip_prefix("messages[") else {
        return match field {
            "batch_id" => whole("--batch-id"),
            other => whole(other),
        };
    };
    let Some((index, sub)) = rest.split_once("].") else {
        return whole(field);
    };
    let Some(line) = index.parse::<usize>().ok().and_then(|i| lines.get(i)) else {
        return whole(field);
    };
    let column = |name: &str| {
        if columns.iter().any(|c| c == name) {
            Place {
                line: Some(*line),
                what: format!("column {name}"),
            }
        } else {
            whole(&format!("column {name} (not in the file)"))
        }
    };
    match sub {
        "phone" => column(PHONE),
        "reference" => column(REFERENCE),
        "template" => whole("--template"),
        "language" => whole("--language"),
        "params" => Place {
            line: Some(*line),
            what: "the parameter columns".to_owned(),
        },
        other => match other
            .strip_prefix("params[")
            .and_then(|p| p.strip_suffix(']'))
        {
            Some(name) => column(name),
            None => Place {
                line: Some(*line),
                what: other.to_owned(),
            },
        },
    }
}

/// The server's field violations of one call (`messages[i]` is `lines[i]` of the file), as lines
/// to print: one per place and problem, the lines of a problem shared by several rows together.
pub fn explain(violations: &[(String, String)], lines: &[u64], columns: &[String]) -> Vec<String> {
    let mut groups: Vec<((String, String), Vec<u64>)> = Vec::new();
    let mut index: BTreeMap<(String, String), usize> = BTreeMap::new();
    for (field, description) in violations {
        let place = place(field, lines, columns);
        let key = (place.what, description.clone());
        let at = *index.entry(key.clone()).or_insert_with(|| {
            groups.push((key, Vec::new()));
            groups.len() - 1
        });
        if let Some(line) = place.line {
            groups[at].1.push(line);
        }
    }
    groups
        .into_iter()
        .map(|((what, description), lines)| match lines.as_slice() {
            [] => format!("{what}: {description}"),
            [line] => format!("line {line}, {what}: {description}"),
            many => format!(
                "lines {}, {what}: {description}",
                many.iter()
                    .map(u64::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn problems(text: &str) -> Vec<String> {
        read(text.as_bytes())
            .expect_err("the file is refused")
            .iter()
            .map(Problem::to_string)
            .collect()
    }

    const HEADER: &str = "phone,reference,nama,nominal\n";

    #[test]
    fn a_comma_file_reads_as_rows_with_their_lines() {
        let sheet = read(
            format!(
                "{HEADER}0812-3456-7890,INV-1,Budi,Rp 150.000\n\"+62 813 1111 2222\",INV-2,\"Sari, S.T.\",\"Rp 1,5 jt\"\n"
            )
            .as_bytes(),
        )
        .unwrap();
        assert_eq!(sheet.params, ["nama", "nominal"]);
        assert_eq!(sheet.delimiter, b',');
        assert_eq!(sheet.rows.len(), 2);
        assert_eq!(
            sheet.rows[1],
            Row {
                line: 3,
                phone: "+62 813 1111 2222".into(),
                reference: "INV-2".into(),
                params: vec![
                    ("nama".into(), "Sari, S.T.".into()),
                    ("nominal".into(), "Rp 1,5 jt".into())
                ],
            }
        );
    }

    #[test]
    fn excel_exports_read_the_same_bom_semicolons_spaces_blank_rows() {
        let text = "\u{feff}Phone ; Reference;nama;nominal;\r\n\
                    0812-3456-7890 ; INV-1 ;  Budi ;Rp 150.000;\r\n\
                    ;;;;\r\n\
                    \r\n\
                    081311112222;INV-2;Sari;Rp 1,5 jt;\r\n";
        let sheet = read(text.as_bytes()).unwrap();
        assert_eq!(sheet.delimiter, b';');
        assert_eq!(sheet.params, ["nama", "nominal"]);
        let got: Vec<_> = sheet
            .rows
            .iter()
            .map(|r| (r.line, r.phone.as_str(), r.reference.as_str()))
            .collect();
        assert_eq!(
            got,
            [(2, "0812-3456-7890", "INV-1"), (5, "081311112222", "INV-2")]
        );
        assert_eq!(sheet.rows[0].params[0], ("nama".into(), "Budi".into()));
        assert_eq!(
            sheet.rows[1].params[1],
            ("nominal".into(), "Rp 1,5 jt".into())
        );
    }

    #[test]
    fn lines_are_the_files_whatever_the_line_ends_and_blank_lines() {
        for end in ["\n", "\r\n"] {
            let text = [
                "",
                "phone,reference,nama",
                "12,INV-1,Budi",
                "",
                ",,",
                "08123456789,INV-2,\"Sari",
                "Dewi\"",
                "",
                "",
                "12,INV-3,Eko",
            ]
            .join(end);
            let got = problems(&text);
            assert_eq!(got.len(), 3, "{got:?}");
            assert!(got[0].starts_with("line 3, column phone"), "{got:?}");
            assert!(got[1].starts_with("line 6, column nama"), "{got:?}");
            assert!(got[2].starts_with("line 10, column phone"), "{got:?}");
        }
    }

    #[test]
    fn the_delimiter_is_the_headers() {
        assert_eq!(delimiter("phone;reference;nama\n1,2;3;4"), b';');
        assert_eq!(delimiter("phone,reference\n1;2"), b',');
        assert_eq!(delimiter("phone,reference;nama"), b',');
        assert_eq!(delimiter("phone"), b',');
        assert_eq!(delimiter("\r\n\nphone;reference"), b';');
        assert_eq!(delimiter(""), b',');
    }

    #[test]
    fn every_problem_is_named_by_line_and_column() {
        let text = format!(
            "{HEADER}08123456789,INV-1,Budi,Rp 1\n\
             ,INV-2,Sari,Rp 2\n\
             081234567891,,Ani,Rp 3\n\
             12,INV-4,Eko,Rp 4\n\
             081234567893,INV-1,Dewi,Rp 5\n\
             081234567894,INV-6,,Rp 6\n\
             081234567895,INV-7,Tono,Rp 7,extra\n\
             6.28123E+11,INV-8,Rina,Rp 8\n"
        );
        let got = problems(&text);
        assert_eq!(got.len(), 7, "{got:#?}");
        assert_eq!(got[0], "line 3, column phone: is empty");
        assert!(
            got[1].starts_with("line 4, column reference: is empty"),
            "{got:?}"
        );
        assert!(
            got[2].starts_with("line 5, column phone: \"12\""),
            "{got:?}"
        );
        assert_eq!(
            got[3],
            "line 6, column reference: \"INV-1\" repeats the reference of line 2; each reference \
             is sent once per batch"
        );
        assert_eq!(got[4], "line 7, column nama: must not be empty");
        assert!(
            got[5].starts_with("line 8: has 5 cells, the header 4"),
            "{got:?}"
        );
        assert!(got[6].starts_with("line 9, column phone:"), "{got:?}");
        assert!(got[6].contains("format the column as Text"), "{got:?}");
    }

    #[test]
    fn line_numbers_count_lines_inside_quoted_cells() {
        let text =
            format!("{HEADER}08123456789,INV-1,\"Budi\nSantoso\",Rp 1\n12,INV-2,Sari,Rp 2\n");
        let got = problems(&text);
        assert!(got[0].starts_with("line 2, column nama: must not contain a line break"));
        assert!(got[1].starts_with("line 4, column phone:"), "{got:?}");
    }

    #[test]
    fn a_header_without_phone_or_reference_is_refused_first() {
        let got = problems("telepon;ref;nama\n0812;1;Budi\n");
        assert_eq!(got.len(), 2, "{got:?}");
        assert!(got[0].starts_with("line 1: the header has no phone column"));
        assert!(got[0].contains("\"telepon\", \"ref\", \"nama\""), "{got:?}");
        assert!(got[1].starts_with("line 1: the header has no reference column"));
        let got = problems("phone,reference,nama,nama\n");
        assert_eq!(got, ["line 1, column nama: appears twice in the header"]);
    }

    #[test]
    fn empty_files_and_files_without_rows_are_refused() {
        assert_eq!(problems("").len(), 1);
        assert!(problems("\u{feff}")[0].contains("the file is empty"));
        assert_eq!(
            problems("phone;reference\n;\n"),
            ["the file has a header but no rows"]
        );
    }

    #[test]
    fn an_unnamed_column_is_ignored_until_it_holds_a_value() {
        let sheet = read(b"phone,reference,,nama\n08123456789,INV-1,,Budi\n").unwrap();
        assert_eq!(sheet.params, ["nama"]);
        let got = problems("phone,reference,,nama\n08123456789,INV-1,x,Budi\n");
        assert!(got[0].starts_with("line 2, column 3: has a value, but the column has no name"));
    }

    #[test]
    fn a_file_that_is_not_utf8_is_refused_with_the_line_and_a_hint() {
        let got = problems_bytes(b"phone,reference,nama\n08123456789,INV-1,Jos\xe9\n");
        assert_eq!(got.len(), 1);
        assert!(
            got[0].starts_with("line 2: the file is not UTF-8"),
            "{got:?}"
        );
        assert!(got[0].contains("CSV UTF-8"));
    }

    fn problems_bytes(bytes: &[u8]) -> Vec<String> {
        read(bytes)
            .unwrap_err()
            .iter()
            .map(Problem::to_string)
            .collect()
    }

    #[test]
    fn a_batch_id_comes_from_the_file_name() {
        let id = |p: &str| batch_id_from_path(Path::new(p));
        assert_eq!(
            id("invoices-2026-12.csv").as_deref(),
            Some("invoices-2026-12")
        );
        assert_eq!(
            id("/tmp/Tagihan Desember (2026).csv").as_deref(),
            Some("Tagihan-Desember-2026")
        );
        assert_eq!(
            id("tagihan_12.2026.v2.csv").as_deref(),
            Some("tagihan_12.2026.v2")
        );
        assert_eq!(
            id("pelanggan–baru  ✓.csv").as_deref(),
            Some("pelanggan-baru")
        );
        assert_eq!(id("✓✓.csv"), None);
        assert_eq!(id(""), None);
        let long = format!("{}.csv", "a".repeat(300));
        assert_eq!(id(&long).unwrap().len(), MAX_BATCH_ID);
        for name in ["x y.csv", "tagihan/desember.csv", "a:b.csv"] {
            let got = id(name).unwrap();
            assert!(
                kabar::domain::batch::rules::check_batch_id(&got).is_ok(),
                "{got}"
            );
        }
    }

    fn owned(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(f, d)| ((*f).to_owned(), (*d).to_owned()))
            .collect()
    }

    #[test]
    fn server_violations_map_to_lines_and_columns() {
        let columns: Vec<String> = ["phone", "reference", "nama", "diskon"]
            .map(String::from)
            .to_vec();
        // The call held the rows of lines 2, 3, 5 and 9.
        let lines = [2, 3, 5, 9];
        let got = explain(
            &owned(&[
                ("messages[2].phone", "not a valid phone number"),
                (
                    "messages[0].params[diskon]",
                    "is not a parameter of template t",
                ),
                (
                    "messages[1].params[diskon]",
                    "is not a parameter of template t",
                ),
                (
                    "messages[3].params[diskon]",
                    "is not a parameter of template t",
                ),
                ("messages[0].params[nominal]", "is required by template t"),
                ("messages[1].params[nominal]", "is required by template t"),
                ("messages[0].template", "unknown template \"x\""),
                ("messages[1].template", "unknown template \"x\""),
                ("messages[3].language", "must be a Meta language code"),
                ("messages[1].reference", "must be at most 256 characters"),
                ("messages[3].params", "the parameters total 2000 characters"),
                ("batch_id", "must be 1 to 128 of ..."),
                ("messages[7].phone", "out of range"),
            ]),
            &lines,
            &columns,
        );
        assert_eq!(
            got,
            [
                "line 5, column phone: not a valid phone number",
                "lines 2, 3, 9, column diskon: is not a parameter of template t",
                "column nominal (not in the file): is required by template t",
                "--template: unknown template \"x\"",
                "--language: must be a Meta language code",
                "line 3, column reference: must be at most 256 characters",
                "line 9, the parameter columns: the parameters total 2000 characters",
                "--batch-id: must be 1 to 128 of ...",
                "messages[7].phone: out of range",
            ]
        );
    }
}
