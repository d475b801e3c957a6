//! `tidegate import-nginx`: reads an nginx configuration (the whole tree, `include`s
//! followed) and writes the equivalent tidegate TOML, with a report of what could not be
//! carried over and why.
//!
//! Two halves:
//! - the parser ([`parse`]) turns nginx's syntax into [`Directive`]s, each with its file and
//!   line. It follows `ngx_conf_read_token`: words, single- and double-quoted strings with the
//!   `\"`, `\'`, `\\`, `\t`, `\r`, `\n` escapes, `#` comments, `${var}` inside words, `;`,
//!   `{` and `}`; OpenResty's `*_by_lua_block { ... }` bodies are skipped as raw Lua.
//!   [`import`] and [`import_str`] also expand `include` (with globs), the way nginx does:
//!   relative to the main file's directory (nginx's conf prefix).
//! - the converter walks `http {}` and `stream {}` and builds the TOML text, one comment per
//!   item naming its nginx source (`# nginx.conf:42`), plus [`Note`]s: what converted with a
//!   caveat (`Warning`) and what could not be converted although it affects routing or
//!   balancing (`Unsupported`). Directives unrelated to proxying are listed as [`Skipped`].
//!
//! Nothing here panics on any input: the fuzzer (`fuzz/fuzz_targets/nginx.rs`) checks that.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::{self, Write as _};
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::Cidr;

/// Deepest block nesting accepted (real configs stay under 10).
const MAX_DEPTH: usize = 64;
/// Deepest `include` chain accepted (a file including itself hits this).
const MAX_INCLUDE_DEPTH: usize = 16;
/// Most files one import may read.
const MAX_FILES: usize = 2048;

// =======================================================================================
// Parser
// =======================================================================================

/// One word of a directive, unescaped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Arg {
    pub value: String,
    /// Written in quotes (`"..."` or `'...'`).
    pub quoted: bool,
    /// Line the word starts on.
    pub line: usize,
}

/// A directive: `name args...;` or `name args... { block }`.
#[derive(Debug, Clone)]
pub struct Directive {
    pub name: String,
    pub args: Vec<Arg>,
    /// The file it was read from (includes keep their own file).
    pub file: Arc<Path>,
    pub line: usize,
    /// The directives inside `{ ... }`; `None` for a simple directive.
    pub block: Option<Vec<Directive>>,
}

impl Directive {
    /// Argument `i` (0-based, after the name).
    pub fn arg(&self, i: usize) -> Option<&str> {
        self.args.get(i).map(|a| a.value.as_str())
    }

    fn loc(&self) -> Loc {
        Loc { file: self.file.clone(), line: self.line }
    }

    fn children(&self) -> &[Directive] {
        self.block.as_deref().unwrap_or_default()
    }

    /// The directive as written, shortened: `proxy_pass http://chat`.
    fn text(&self) -> String {
        let mut s = self.name.clone();
        for a in &self.args {
            s.push(' ');
            if a.quoted || a.value.is_empty() || a.value.contains(char::is_whitespace) {
                let _ = write!(s, "{:?}", a.value);
            } else {
                s.push_str(&a.value);
            }
        }
        if s.chars().count() > 80 {
            s = s.chars().take(77).collect::<String>() + "...";
        }
        s
    }
}

/// A syntax error, a bad include or an unreadable file, located as `FILE:LINE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    pub file: PathBuf,
    /// 1-based; 0 when unknown.
    pub line: usize,
    pub message: String,
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}: {}", self.file.display(), self.message)
        } else {
            write!(f, "{}:{}: {}", self.file.display(), self.line, self.message)
        }
    }
}

impl std::error::Error for Error {}

/// Where files come from: the disk ([`DiskFs`]), memory ([`MemFs`], for tests), or any
/// `Fn(&Path) -> io::Result<String>` (which cannot list directories, so globs fail).
pub trait Fs {
    fn read(&self, path: &Path) -> io::Result<String>;
    /// Entries of a directory: (file name, is a directory).
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>>;
}

impl<F: Fn(&Path) -> io::Result<String>> Fs for F {
    fn read(&self, path: &Path) -> io::Result<String> {
        self(path)
    }
    fn list(&self, _dir: &Path) -> io::Result<Vec<(String, bool)>> {
        Err(io::Error::new(io::ErrorKind::Unsupported, "cannot list directories"))
    }
}

/// The real file system.
#[derive(Debug, Clone, Copy, Default)]
pub struct DiskFs;

impl Fs for DiskFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        let bytes = std::fs::read(path)?;
        Ok(String::from_utf8(bytes).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned()))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let dir = if dir.as_os_str().is_empty() { Path::new(".") } else { dir };
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir)? {
            let e = e?;
            let is_dir = e.file_type().map(|t| t.is_dir()).unwrap_or(false) || e.path().is_dir();
            out.push((e.file_name().to_string_lossy().into_owned(), is_dir));
        }
        Ok(out)
    }
}

/// Files held in memory, keyed by path (for tests and tools).
#[derive(Debug, Clone, Default)]
pub struct MemFs {
    files: BTreeMap<PathBuf, String>,
}

impl MemFs {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds (or replaces) a file.
    pub fn with(mut self, path: impl Into<PathBuf>, text: impl Into<String>) -> Self {
        self.files.insert(path.into(), text.into());
        self
    }
}

impl Fs for MemFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        self.files.get(&normalize(path)).cloned().ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "No such file or directory"))
    }
    fn list(&self, dir: &Path) -> io::Result<Vec<(String, bool)>> {
        let dir = normalize(dir);
        let mut out: BTreeMap<String, bool> = BTreeMap::new();
        for p in self.files.keys() {
            let Ok(rest) = p.strip_prefix(&dir) else { continue };
            let mut comps = rest.components();
            if let Some(Component::Normal(first)) = comps.next() {
                let is_dir = comps.next().is_some();
                let e = out.entry(first.to_string_lossy().into_owned()).or_insert(is_dir);
                *e |= is_dir;
            }
        }
        if out.is_empty() {
            return Err(io::Error::new(io::ErrorKind::NotFound, "No such file or directory"));
        }
        Ok(out.into_iter().collect())
    }
}

/// `a/./b/../c` → `a/c` (lexically; for in-memory lookups).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A lexical token.
#[derive(Debug)]
enum Token {
    Word(Arg),
    Semi(usize),
    Open(usize),
    Close(usize),
    Eof(usize),
}

/// nginx's tokenizer (`ngx_conf_read_token`), byte by byte.
struct Lexer<'a> {
    src: &'a [u8],
    pos: usize,
    line: usize,
    file: &'a Path,
}

impl<'a> Lexer<'a> {
    fn new(text: &'a str, file: &'a Path) -> Self {
        Lexer { src: text.as_bytes(), pos: 0, line: 1, file }
    }

    fn err(&self, line: usize, message: impl Into<String>) -> Error {
        Error { file: self.file.to_path_buf(), line, message: message.into() }
    }

    fn peek(&self) -> Option<u8> {
        self.src.get(self.pos).copied()
    }

    fn next_token(&mut self) -> Result<Token, Error> {
        loop {
            let Some(c) = self.peek() else { return Ok(Token::Eof(self.line)) };
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b' ' | b'\t' | b'\r' => self.pos += 1,
                b'#' => {
                    while self.peek().is_some_and(|c| c != b'\n') {
                        self.pos += 1;
                    }
                }
                _ => break,
            }
        }
        let line = self.line;
        let Some(c) = self.peek() else { return Ok(Token::Eof(line)) };
        match c {
            b';' => {
                self.pos += 1;
                Ok(Token::Semi(line))
            }
            b'{' => {
                self.pos += 1;
                Ok(Token::Open(line))
            }
            b'}' => {
                self.pos += 1;
                Ok(Token::Close(line))
            }
            b'"' | b'\'' => self.quoted(c),
            _ => self.bare(),
        }
    }

    /// Handles a backslash at `self.pos`: pushes the unescaped bytes, advances past them.
    fn escape(&mut self, out: &mut Vec<u8>) {
        let next = self.src.get(self.pos + 1).copied();
        match next {
            Some(c @ (b'"' | b'\'' | b'\\')) => {
                out.push(c);
                self.pos += 2;
            }
            Some(b't') => {
                out.push(b'\t');
                self.pos += 2;
            }
            Some(b'r') => {
                out.push(b'\r');
                self.pos += 2;
            }
            Some(b'n') => {
                out.push(b'\n');
                self.pos += 2;
            }
            Some(c) => {
                // Any other escaped byte stays as written, backslash included, but is part
                // of the word whatever it is (a space, `;`, a quote).
                out.push(b'\\');
                out.push(c);
                if c == b'\n' {
                    self.line += 1;
                }
                self.pos += 2;
            }
            None => {
                out.push(b'\\');
                self.pos += 1;
            }
        }
    }

    fn quoted(&mut self, quote: u8) -> Result<Token, Error> {
        let line = self.line;
        self.pos += 1;
        let mut out = Vec::new();
        loop {
            let Some(c) = self.peek() else {
                let q = quote as char;
                return Err(self.err(line, format!("unterminated quoted string: the {q}...{q} opened on line {line} is never closed")));
            };
            match c {
                b'\\' => {
                    if self.pos + 1 >= self.src.len() {
                        let q = quote as char;
                        return Err(
                            self.err(line, format!("unterminated quoted string: the {q}...{q} opened on line {line} is never closed"))
                        );
                    }
                    self.escape(&mut out);
                }
                c if c == quote => {
                    self.pos += 1;
                    break;
                }
                b'\n' => {
                    self.line += 1;
                    out.push(c);
                    self.pos += 1;
                }
                _ => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        // nginx wants a separator after a closing quote.
        match self.peek() {
            None | Some(b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' | b')') => {}
            Some(c) => {
                let shown = if c.is_ascii_graphic() { format!("{:?}", c as char) } else { format!("byte 0x{c:02x}") };
                return Err(self.err(self.line, format!("unexpected {shown} after a quoted string; expected a space, \";\" or \"{{\"")));
            }
        }
        Ok(Token::Word(Arg { value: bytes_to_string(out), quoted: true, line }))
    }

    fn bare(&mut self) -> Result<Token, Error> {
        let line = self.line;
        let mut out = Vec::new();
        let mut variable = false;
        while let Some(c) = self.peek() {
            match c {
                b'{' if variable => {
                    out.push(c);
                    self.pos += 1;
                    variable = false;
                    continue;
                }
                b' ' | b'\t' | b'\r' | b'\n' | b';' | b'{' => break,
                b'\\' => {
                    self.escape(&mut out);
                    variable = false;
                    continue;
                }
                _ => {
                    out.push(c);
                    self.pos += 1;
                }
            }
            variable = c == b'$';
        }
        Ok(Token::Word(Arg { value: bytes_to_string(out), quoted: false, line }))
    }

    /// Skips an OpenResty `*_by_lua_block { ... }` body (the `{` is consumed): Lua strings,
    /// long brackets and comments may hold braces.
    fn skip_lua(&mut self, open_line: usize) -> Result<(), Error> {
        let mut depth = 1usize;
        while let Some(c) = self.peek() {
            match c {
                b'\n' => {
                    self.line += 1;
                    self.pos += 1;
                }
                b'{' => {
                    depth += 1;
                    self.pos += 1;
                }
                b'}' => {
                    depth -= 1;
                    self.pos += 1;
                    if depth == 0 {
                        return Ok(());
                    }
                }
                b'"' | b'\'' => {
                    self.pos += 1;
                    while let Some(d) = self.peek() {
                        self.pos += 1;
                        match d {
                            b'\\' => self.pos += 1,
                            b'\n' => self.line += 1,
                            d if d == c => break,
                            _ => {}
                        }
                    }
                }
                b'-' if self.src.get(self.pos + 1) == Some(&b'-') => {
                    self.pos += 2;
                    if !self.long_bracket() {
                        while self.peek().is_some_and(|c| c != b'\n') {
                            self.pos += 1;
                        }
                    }
                }
                b'[' => {
                    if !self.long_bracket() {
                        self.pos += 1;
                    }
                }
                _ => self.pos += 1,
            }
        }
        Err(self.err(open_line, format!("unexpected end of file: the Lua block opened on line {open_line} is never closed")))
    }

    /// A Lua long bracket `[[...]]` / `[==[...]==]` at `pos`: skips it and returns true.
    fn long_bracket(&mut self) -> bool {
        if self.peek() != Some(b'[') {
            return false;
        }
        let mut i = self.pos + 1;
        let mut level = 0;
        while self.src.get(i) == Some(&b'=') {
            level += 1;
            i += 1;
        }
        if self.src.get(i) != Some(&b'[') {
            return false;
        }
        let mut close = vec![b']'];
        close.extend(std::iter::repeat_n(b'=', level));
        close.push(b']');
        self.pos = i + 1;
        while self.pos < self.src.len() {
            if self.src[self.pos..].starts_with(&close) {
                self.pos += close.len();
                return true;
            }
            if self.src[self.pos] == b'\n' {
                self.line += 1;
            }
            self.pos += 1;
        }
        true
    }
}

fn bytes_to_string(b: Vec<u8>) -> String {
    String::from_utf8(b).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Directive names that, found at the start of a line inside another directive's
/// arguments, almost surely mean the previous line lacks its `;`.
const LINE_STARTERS: &[&str] = &[
    "listen",
    "server",
    "server_name",
    "location",
    "upstream",
    "proxy_pass",
    "proxy_set_header",
    "proxy_read_timeout",
    "proxy_connect_timeout",
    "proxy_send_timeout",
    "proxy_http_version",
    "keepalive",
    "least_conn",
    "ip_hash",
    "hash",
    "zone",
    "include",
    "root",
    "index",
    "return",
    "rewrite",
    "ssl_certificate",
    "ssl_certificate_key",
    "ssl_protocols",
    "access_log",
    "error_log",
    "client_max_body_size",
    "worker_processes",
    "worker_connections",
    "sticky",
    "check",
];

/// How included files are found.
struct Includes<'a> {
    fs: &'a dyn Fs,
    /// nginx's conf prefix: the main file's directory.
    prefix: PathBuf,
    files: usize,
    notes: Vec<Note>,
}

/// Parses one file's text into directives. `include` directives are kept as they are (use
/// [`import`] or [`import_str`] to follow them).
pub fn parse(text: &str, path: &Path) -> Result<Vec<Directive>, Error> {
    parse_file(text, path, None, 0)
}

fn parse_file(text: &str, path: &Path, mut includes: Option<&mut Includes<'_>>, include_depth: usize) -> Result<Vec<Directive>, Error> {
    let file: Arc<Path> = Arc::from(path);
    let mut lex = Lexer::new(text, path);
    // Open blocks: the directive (without its block yet) and the children read so far.
    let mut stack: Vec<(Directive, Vec<Directive>)> = Vec::new();
    let mut top: Vec<Directive> = Vec::new();
    let mut words: Vec<Arg> = Vec::new();
    loop {
        match lex.next_token()? {
            Token::Word(a) => {
                if let (Some(first), Some(prev)) = (words.first(), words.last())
                    && a.line > prev.line
                    && !a.quoted
                    && LINE_STARTERS.contains(&a.value.as_str())
                    && !matches!(first.value.as_str(), "log_format" | "add_header" | "more_set_headers" | "map")
                {
                    return Err(lex.err(
                        prev.line,
                        format!(
                            "missing \";\" at the end of line {}: directive \"{}\" runs on into \"{}\" on line {}",
                            prev.line, first.value, a.value, a.line
                        ),
                    ));
                }
                words.push(a);
            }
            Token::Semi(line) => {
                if words.is_empty() {
                    return Err(lex.err(line, "unexpected \";\""));
                }
                let d = make_directive(std::mem::take(&mut words), &file, None);
                let into = match stack.last_mut() {
                    Some((_, children)) => children,
                    None => &mut top,
                };
                match includes.as_deref_mut() {
                    Some(inc) if d.name == "include" => {
                        let mut spliced = inc.include(&d, include_depth)?;
                        into.append(&mut spliced);
                    }
                    _ => into.push(d),
                }
            }
            Token::Open(line) => {
                if words.is_empty() {
                    return Err(lex.err(line, "unexpected \"{\""));
                }
                if stack.len() >= MAX_DEPTH {
                    return Err(lex.err(line, format!("blocks nested more than {MAX_DEPTH} deep")));
                }
                let d = make_directive(std::mem::take(&mut words), &file, None);
                if d.name.ends_with("_by_lua_block") {
                    lex.skip_lua(line)?;
                    let d = Directive { block: Some(Vec::new()), ..d };
                    match stack.last_mut() {
                        Some((_, children)) => children.push(d),
                        None => top.push(d),
                    }
                } else {
                    stack.push((d, Vec::new()));
                }
            }
            Token::Close(line) => {
                if let Some(first) = words.first() {
                    return Err(lex.err(
                        line,
                        format!("unexpected \"}}\": missing \";\" after directive \"{}\" (line {})", first.value, first.line),
                    ));
                }
                let Some((mut d, children)) = stack.pop() else {
                    return Err(lex.err(line, "unexpected \"}\": no block is open"));
                };
                d.block = Some(children);
                match stack.last_mut() {
                    Some((_, c)) => c.push(d),
                    None => top.push(d),
                }
            }
            Token::Eof(line) => {
                if let Some(first) = words.first() {
                    return Err(lex.err(
                        first.line,
                        format!("unexpected end of file: missing \";\" after directive \"{}\" (line {})", first.value, first.line),
                    ));
                }
                if let Some((d, _)) = stack.last() {
                    return Err(lex.err(
                        line,
                        format!(
                            "unexpected end of file, expecting \"}}\": the \"{}\" block opened on line {} is not closed",
                            d.name, d.line
                        ),
                    ));
                }
                return Ok(top);
            }
        }
    }
}

fn make_directive(mut words: Vec<Arg>, file: &Arc<Path>, block: Option<Vec<Directive>>) -> Directive {
    let first = words.remove(0);
    Directive { name: first.value, args: words, file: file.clone(), line: first.line, block }
}

/// Include files nginx installs that never matter to proxying: a missing one is a warning.
const HARMLESS_INCLUDES: &[&str] =
    &["mime.types", "fastcgi_params", "fastcgi.conf", "scgi_params", "uwsgi_params", "koi-utf", "koi-win", "win-utf", "proxy_params"];

impl Includes<'_> {
    /// The directives of every file `include PATTERN` names, in glob order.
    fn include(&mut self, d: &Directive, depth: usize) -> Result<Vec<Directive>, Error> {
        let here = |message: String| Error { file: d.file.to_path_buf(), line: d.line, message };
        let Some(pattern) = d.arg(0).filter(|_| d.args.len() == 1) else {
            return Err(here("invalid number of arguments in \"include\": expected one file name or pattern".into()));
        };
        if depth >= MAX_INCLUDE_DEPTH {
            return Err(here(format!("include \"{pattern}\": includes nested more than {MAX_INCLUDE_DEPTH} deep (does a file include itself?)")));
        }
        if pattern.is_empty() {
            return Err(here("include: empty file name".into()));
        }
        let has_glob = pattern.contains(['*', '?', '[']);
        let raw = Path::new(pattern);
        // nginx resolves relative includes against the conf prefix (the main file's
        // directory), whichever file includes them; the including file's own directory is
        // tried second, for trees written with that convention.
        let mut candidates = vec![if raw.is_absolute() { raw.to_path_buf() } else { self.prefix.join(raw) }];
        if !raw.is_absolute()
            && let Some(dir) = d.file.parent()
            && dir != self.prefix
        {
            candidates.push(dir.join(raw));
        }
        let mut files = Vec::new();
        let mut first_err: Option<String> = None;
        for c in &candidates {
            if has_glob {
                match glob(self.fs, c) {
                    Ok(found) if !found.is_empty() => {
                        files = found;
                        break;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        first_err.get_or_insert_with(|| format!("include \"{pattern}\": cannot list {}: {e}", c.display()));
                    }
                }
            } else {
                match self.fs.read(c) {
                    Ok(text) => {
                        files.push(c.clone());
                        self.files += 1;
                        if self.files > MAX_FILES {
                            return Err(here(format!("more than {MAX_FILES} files included")));
                        }
                        return parse_file(&text, c, Some(self), depth + 1);
                    }
                    Err(e) => {
                        first_err.get_or_insert_with(|| format!("include \"{pattern}\": cannot read {}: {e}", c.display()));
                    }
                }
            }
        }
        if !has_glob {
            let base = raw.file_name().and_then(|n| n.to_str()).unwrap_or_default();
            if HARMLESS_INCLUDES.contains(&base) {
                self.notes.push(Note {
                    file: d.file.to_path_buf(),
                    line: d.line,
                    level: Level::Warning,
                    message: format!("include \"{pattern}\" not found; skipped (it only holds settings unrelated to proxying)"),
                });
                return Ok(Vec::new());
            }
            return Err(here(first_err.unwrap_or_else(|| format!("include \"{pattern}\": file not found"))));
        }
        if files.is_empty() {
            // nginx accepts a pattern that matches nothing.
            self.notes.push(Note {
                file: d.file.to_path_buf(),
                line: d.line,
                level: Level::Warning,
                message: match first_err {
                    Some(e) => format!("{e}; nothing included"),
                    None => format!("include \"{pattern}\" matches no file; nothing included"),
                },
            });
            return Ok(Vec::new());
        }
        let mut out = Vec::new();
        for f in files {
            self.files += 1;
            if self.files > MAX_FILES {
                return Err(here(format!("more than {MAX_FILES} files included")));
            }
            let text = self.fs.read(&f).map_err(|e| here(format!("include \"{pattern}\": cannot read {}: {e}", f.display())))?;
            out.extend(parse_file(&text, &f, Some(self), depth + 1)?);
        }
        Ok(out)
    }
}

/// Files matching `pattern` (`*`, `?`, `[...]` in any component), sorted like glob(3) in
/// the C locale; names starting with `.` only match a pattern starting with `.`.
fn glob(fs: &dyn Fs, pattern: &Path) -> io::Result<Vec<PathBuf>> {
    let comps: Vec<Component<'_>> = pattern.components().collect();
    let mut bases: Vec<(PathBuf, bool)> = vec![(PathBuf::new(), true)];
    for (i, c) in comps.iter().enumerate() {
        let last = i + 1 == comps.len();
        let Component::Normal(name) = c else {
            for (b, _) in &mut bases {
                b.push(c.as_os_str());
            }
            continue;
        };
        let name = name.to_string_lossy();
        if !name.contains(['*', '?', '[']) {
            for (b, _) in &mut bases {
                b.push(name.as_ref());
            }
            continue;
        }
        let mut next = Vec::new();
        for (b, _) in &bases {
            let entries = match fs.list(b) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            let mut entries: Vec<(String, bool)> =
                entries.into_iter().filter(|(n, _)| (!n.starts_with('.') || name.starts_with('.')) && wildcard_match(&name, n)).collect();
            entries.sort();
            for (n, is_dir) in entries {
                if !last && !is_dir {
                    continue;
                }
                next.push((b.join(n), is_dir));
            }
        }
        bases = next;
        if bases.is_empty() {
            break;
        }
    }
    let mut out: Vec<PathBuf> = bases.into_iter().filter(|(_, is_dir)| !is_dir).map(|(p, _)| p).collect();
    out.sort();
    // A literal last component (`dir/*/site.conf`): keep only files that exist.
    if comps.last().is_some_and(|c| !c.as_os_str().to_string_lossy().contains(['*', '?', '['])) {
        out.retain(|p| fs.read(p).is_ok());
    }
    Ok(out)
}

/// fnmatch(3) without flags: `*`, `?`, `[abc]`, `[a-z]`, `[!x]` / `[^x]`.
fn wildcard_match(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0usize, 0usize);
    let mut star: Option<(usize, usize)> = None;
    while ni < n.len() {
        let step = match p.get(pi) {
            Some('*') => {
                star = Some((pi, ni));
                pi += 1;
                continue;
            }
            Some('?') => Some(1),
            Some('[') => class_match(&p[pi..], n[ni]),
            Some(&c) if c == n[ni] => Some(1),
            _ => None,
        };
        match step {
            Some(len) => {
                pi += len;
                ni += 1;
            }
            None => match star {
                Some((sp, sn)) => {
                    pi = sp + 1;
                    ni = sn + 1;
                    star = Some((sp, sn + 1));
                }
                None => return false,
            },
        }
    }
    p[pi..].iter().all(|&c| c == '*')
}

/// A `[...]` class at the start of `p` against `c`: the class length when it matches.
/// An unterminated `[` is a literal `[`.
fn class_match(p: &[char], c: char) -> Option<usize> {
    let mut i = 1;
    let negate = matches!(p.get(1), Some('!' | '^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while let Some(&ch) = p.get(i) {
        if ch == ']' && !first {
            return (matched != negate).then_some(i + 1);
        }
        first = false;
        if p.get(i + 1) == Some(&'-') && p.get(i + 2).is_some_and(|&e| e != ']') {
            let end = p[i + 2];
            if ch <= c && c <= end {
                matched = true;
            }
            i += 3;
        } else {
            if ch == c {
                matched = true;
            }
            i += 1;
        }
    }
    (c == '[').then_some(1)
}

/// The parts of a word: literal text and `$name` / `${name}` variables.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Part {
    Text(String),
    Var(String),
}

/// Splits a word into text and variables, as nginx's script compiler does.
pub fn variables(word: &str) -> Vec<Part> {
    let mut out = Vec::new();
    let mut text = String::new();
    let mut chars = word.char_indices().peekable();
    while let Some((_, c)) = chars.next() {
        if c != '$' {
            text.push(c);
            continue;
        }
        let mut name = String::new();
        if chars.peek().is_some_and(|&(_, c)| c == '{') {
            chars.next();
            let mut closed = false;
            for (_, c) in chars.by_ref() {
                if c == '}' {
                    closed = true;
                    break;
                }
                name.push(c);
            }
            if !closed {
                text.push_str("${");
                text.push_str(&name);
                continue;
            }
        } else {
            while let Some(&(_, c)) = chars.peek() {
                if c.is_ascii_alphanumeric() || c == '_' {
                    name.push(c);
                    chars.next();
                } else {
                    break;
                }
            }
        }
        if name.is_empty() {
            text.push('$');
            continue;
        }
        if !text.is_empty() {
            out.push(Part::Text(std::mem::take(&mut text)));
        }
        out.push(Part::Var(name));
    }
    if !text.is_empty() {
        out.push(Part::Text(text));
    }
    out
}

/// The variable name when `word` is exactly one variable (`$x` or `${x}`).
fn single_var(word: &str) -> Option<String> {
    match variables(word).as_slice() {
        [Part::Var(v)] => Some(v.clone()),
        _ => None,
    }
}

fn has_vars(word: &str) -> bool {
    variables(word).iter().any(|p| matches!(p, Part::Var(_)))
}

// =======================================================================================
// Report
// =======================================================================================

/// How a directive was carried over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Level {
    /// Converted; the message says what it became (or why nothing is needed).
    Converted,
    /// Converted with a difference in behaviour, or not carried over although it does not
    /// change where requests go.
    Warning,
    /// Not converted, and it changes routing, balancing or what is served.
    Unsupported,
}

impl Level {
    fn name(self) -> &'static str {
        match self {
            Level::Converted => "converted",
            Level::Warning => "warning",
            Level::Unsupported => "unsupported",
        }
    }
}

/// One remark about the conversion, at an nginx file and line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    /// Relative to the main file's directory when below it.
    pub file: PathBuf,
    pub line: usize,
    pub level: Level,
    pub message: String,
}

impl fmt::Display for Note {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}: {}: {}", self.file.display(), self.line, self.level.name(), self.message)
    }
}

/// A directive unrelated to proxying, skipped.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Skipped {
    pub file: PathBuf,
    pub line: usize,
    pub directive: String,
}

/// The result of an import: the TOML text and what to tell the user.
#[derive(Debug, Clone)]
pub struct Import {
    pub toml: String,
    /// In source order (file, line).
    pub notes: Vec<Note>,
    pub skipped: Vec<Skipped>,
}

impl Import {
    /// Everything that affects routing or balancing was converted (no `Unsupported` note).
    pub fn complete(&self) -> bool {
        !self.notes.iter().any(|n| n.level == Level::Unsupported)
    }

    /// What could not be carried over and why (warnings and unsupported items, one per
    /// line), then a one-line summary of the skipped directives.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for n in self.notes.iter().filter(|n| n.level != Level::Converted) {
            let _ = writeln!(out, "{n}");
        }
        if !self.skipped.is_empty() {
            let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
            for s in &self.skipped {
                *counts.entry(s.directive.as_str()).or_default() += 1;
            }
            let list: Vec<String> = counts.iter().map(|(d, n)| if *n > 1 { format!("{d} (x{n})") } else { d.to_string() }).collect();
            let _ = writeln!(out, "skipped {} directive(s) unrelated to proxying: {}", self.skipped.len(), list.join(", "));
        }
        out
    }
}

/// Reads the nginx config at `path` (and every file it includes) and converts it.
pub fn import(path: &Path) -> Result<Import, Error> {
    let path = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let text = DiskFs.read(&path).map_err(|e| Error { file: path.clone(), line: 0, message: format!("cannot read nginx config: {e}") })?;
    import_str(&text, &path, &DiskFs)
}

/// Converts nginx config `text` read from `path`; includes are read through `fs` (relative
/// ones against `path`'s directory, like nginx's conf prefix).
pub fn import_str(text: &str, path: &Path, fs: &dyn Fs) -> Result<Import, Error> {
    let prefix = path.parent().map(Path::to_path_buf).unwrap_or_default();
    let mut inc = Includes { fs, prefix: prefix.clone(), files: 1, notes: Vec::new() };
    let tree = parse_file(text, path, Some(&mut inc), 0)?;
    let mut cx = Cx::new(prefix, path.to_path_buf());
    for n in inc.notes {
        let file = cx.shown(&n.file);
        cx.notes.push(Note { file, ..n });
    }
    cx.main(&tree);
    Ok(cx.finish())
}

// =======================================================================================
// Converter: model
// =======================================================================================

#[derive(Debug, Clone)]
struct Loc {
    file: Arc<Path>,
    line: usize,
}

/// Where a directive sits, for classifying what it means there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ctx {
    Main,
    Http,
    Server,
    /// `proxies`: the location has a `proxy_pass` (else content directives are covered by
    /// the location's own note).
    Location {
        proxies: bool,
    },
    Upstream,
    Stream,
    StreamServer,
}

/// A `proxy_set_header`.
#[derive(Debug, Clone)]
struct Header {
    name: String,
    value: String,
    loc: Loc,
}

type Val<T> = Option<(T, Loc)>;

/// Settings inherited from `http` to `server` to `location` (or `stream` to `server`).
#[derive(Debug, Clone, Default)]
struct Scope {
    connect: Val<u64>,
    read: Val<u64>,
    send: Val<u64>,
    /// stream's `proxy_timeout`.
    stream_timeout: Val<u64>,
    tries: Val<u64>,
    next_upstream: Val<Vec<String>>,
    /// Array directives are inherited only by levels that set none of their own.
    headers: Vec<Header>,
    certs: Vec<(String, Loc)>,
    keys: Vec<(String, Loc)>,
    protocols: Val<Vec<String>>,
    ssl_on: bool,
    keepalive_timeout: Val<u64>,
    header_timeout: Val<u64>,
    real_ip_from: Vec<(String, Loc)>,
    real_ip_header: Val<String>,
    ssl_verify: Val<bool>,
    ssl_trusted: Val<String>,
    ssl_name: Val<String>,
    ssl_server_name: bool,
    /// stream `proxy_protocol on` (send to servers).
    send_proxy: Option<Loc>,
    ssl_preread: bool,
    /// stream `proxy_ssl on`.
    proxy_ssl: Option<Loc>,
}

#[derive(Debug, Clone, PartialEq)]
enum Method {
    RoundRobin,
    LeastConn,
    IpHash,
    /// The tidegate key (`ip`, `header:X`, ...), and whether nginx hashed consistently.
    Hash {
        key: String,
        consistent: bool,
    },
    /// `random` (weighted random).
    Random,
    /// `random two [least_conn]`.
    RandomTwo,
}

#[derive(Debug, Clone)]
struct Srv {
    addr: String,
    weight: u32,
    max_fails: Option<u32>,
    fail_timeout: Option<u64>,
    backup: bool,
    down: bool,
    max_conns: Option<u32>,
    loc: Loc,
    /// The address as nginx wrote it differs from tidegate's `IP:PORT` text (hostname,
    /// missing port): a consistent-hash ring built from it differs.
    non_canonical: bool,
}

#[derive(Debug, Clone, Default)]
struct StickyCfg {
    name: Option<String>,
    max_age: Option<String>,
    domain: Option<String>,
    path: Option<String>,
    same_site: Option<&'static str>,
    secret: Option<String>,
    loc: Option<Loc>,
}

#[derive(Debug, Clone)]
struct HealthCfg {
    kind: &'static str,
    interval: u64,
    timeout: u64,
    rise: u64,
    fall: u64,
    start_healthy: bool,
    path: Option<String>,
    host: Option<String>,
    expect: Option<Vec<u16>>,
    loc: Loc,
}

#[derive(Debug, Clone)]
struct UpTls {
    verify: bool,
    ca: Option<String>,
    sni: Option<String>,
    loc: Loc,
}

/// One place an upstream is used from (a `proxy_pass`), with the settings in force there.
#[derive(Debug, Clone)]
struct Use {
    loc: Loc,
    ws: bool,
    stream: bool,
    connect: Val<u64>,
    read: Val<u64>,
    send: Val<u64>,
    stream_timeout: Val<u64>,
    tries: Val<u64>,
    next_upstream: Val<Vec<String>>,
    send_proxy: Option<Loc>,
}

#[derive(Debug, Clone)]
struct Up {
    name: String,
    /// The header comment: `upstream chat` or `proxy_pass http://127.0.0.1:9000`.
    label: String,
    loc: Loc,
    stream: bool,
    method: Method,
    method_loc: Option<Loc>,
    sticky: Option<StickyCfg>,
    keepalive: Val<u64>,
    servers: Vec<Srv>,
    health: Option<HealthCfg>,
    /// Why it cannot be written (no usable server, ...).
    dead: Option<String>,
    uses: Vec<Use>,
    tls: Option<UpTls>,
    host_warned: bool,
}

#[derive(Debug, Clone)]
struct ListenSpec {
    addr: SocketAddr,
    ssl: bool,
    default: bool,
    proxy_protocol: bool,
    loc: Loc,
}

#[derive(Debug, Clone)]
struct DraftRoute {
    /// `None`: every path (`location /`).
    prefix: Option<String>,
    exact: bool,
    upstream: usize,
    loc: Loc,
    label: String,
}

#[derive(Debug, Clone)]
struct HttpServer {
    loc: Loc,
    listens: Vec<ListenSpec>,
    names: Vec<(String, Loc)>,
    routes: Vec<DraftRoute>,
    scope: Scope,
    /// A server-level `return`: nginx answers everything itself.
    answers_itself: bool,
}

/// `map $source $target { ... }`.
#[derive(Debug, Clone)]
struct MapDef {
    source: String,
    target: String,
    hostnames: bool,
    default: Option<(String, Loc)>,
    entries: Vec<(String, String, Loc)>,
    loc: Loc,
    stream: bool,
}

#[derive(Debug, Clone)]
struct OutRoute {
    host: Option<String>,
    sni: Option<String>,
    prefix: Option<String>,
    upstream: usize,
    comment: String,
}

#[derive(Debug, Clone)]
struct OutListener {
    name: String,
    bind: String,
    mode: &'static str,
    comment: String,
    /// `mode = "tcp"`.
    upstream: Option<usize>,
    accept_proxy: Option<Loc>,
    trusted: Vec<String>,
    trusted_comment: String,
    keepalive_idle: Val<u64>,
    header_read: Val<u64>,
    certs: Vec<(String, String, bool, Loc)>,
    min_version: Val<&'static str>,
    no_alpn: bool,
    routes: Vec<OutRoute>,
    order: (Arc<Path>, usize),
}

struct Cx {
    prefix: PathBuf,
    main_file: PathBuf,
    notes: Vec<Note>,
    seen_notes: BTreeSet<(PathBuf, usize, Level, String)>,
    skipped: Vec<Skipped>,
    shutdown_timeout: Val<u64>,
    ups: Vec<Up>,
    http_names: BTreeMap<String, usize>,
    stream_names: BTreeMap<String, usize>,
    /// One-server upstreams made from `proxy_pass ADDRESS`, by (stream, address, tls).
    addr_ups: BTreeMap<(bool, String, bool), usize>,
    taken: BTreeSet<String>,
    maps: Vec<MapDef>,
    servers: Vec<HttpServer>,
    listeners: Vec<OutListener>,
}

// =======================================================================================
// Converter: directive classes
// =======================================================================================

/// Directives unrelated to proxying: listed as skipped.
const IRRELEVANT: &[&str] = &[
    "user",
    "worker_processes",
    "worker_rlimit_nofile",
    "worker_cpu_affinity",
    "worker_priority",
    "worker_rlimit_core",
    "worker_connections",
    "worker_aio_requests",
    "pid",
    "error_log",
    "access_log",
    "log_format",
    "log_not_found",
    "log_subrequest",
    "open_log_file_cache",
    "load_module",
    "daemon",
    "master_process",
    "pcre_jit",
    "thread_pool",
    "timer_resolution",
    "env",
    "lock_file",
    "working_directory",
    "debug_points",
    "debug_connection",
    "ssl_engine",
    "use",
    "multi_accept",
    "accept_mutex",
    "accept_mutex_delay",
    "sendfile",
    "sendfile_max_chunk",
    "tcp_nopush",
    "tcp_nodelay",
    "types",
    "types_hash_max_size",
    "types_hash_bucket_size",
    "default_type",
    "charset",
    "charset_types",
    "source_charset",
    "override_charset",
    "server_tokens",
    "server_names_hash_bucket_size",
    "server_names_hash_max_size",
    "variables_hash_max_size",
    "variables_hash_bucket_size",
    "map_hash_bucket_size",
    "map_hash_max_size",
    "proxy_headers_hash_max_size",
    "proxy_headers_hash_bucket_size",
    "aio",
    "aio_write",
    "directio",
    "directio_alignment",
    "output_buffers",
    "postpone_output",
    "read_ahead",
    "send_lowat",
    "reset_timedout_connection",
    "resolver",
    "resolver_timeout",
    "client_body_temp_path",
    "proxy_temp_path",
    "fastcgi_temp_path",
    "uwsgi_temp_path",
    "scgi_temp_path",
    "client_body_buffer_size",
    "client_header_buffer_size",
    "large_client_header_buffers",
    "client_body_in_file_only",
    "client_body_in_single_buffer",
    "etag",
    "if_modified_since",
    "server_name_in_redirect",
    "port_in_redirect",
    "absolute_redirect",
    "msie_padding",
    "msie_refresh",
    "lingering_close",
    "lingering_time",
    "lingering_timeout",
    "keepalive_requests",
    "keepalive_time",
    "keepalive_disable",
    "ignore_invalid_headers",
    "merge_slashes",
    "disable_symlinks",
    "limit_req_zone",
    "limit_conn_zone",
    "limit_req_log_level",
    "limit_conn_log_level",
    "limit_req_status",
    "limit_conn_status",
    "real_ip_recursive",
    "root",
    "alias",
    "index",
    "autoindex",
    "autoindex_exact_size",
    "autoindex_format",
    "autoindex_localtime",
    "uninitialized_variable_warn",
    "proxy_cache_path",
    "fastcgi_cache_path",
    "uwsgi_cache_path",
    "scgi_cache_path",
    "geo",
    "split_clients",
    "variables_hash",
    "stub_status_zone",
    "ssl_session_cache",
    "preread_buffer_size",
    "preread_timeout",
    "proxy_buffer_size",
    "variables",
];

/// Name prefixes of directives unrelated to proxying.
const IRRELEVANT_PREFIXES: &[&str] = &["gzip", "gunzip", "brotli", "zstd", "open_file_cache", "geoip", "quic_", "http3_", "ssl_stapling"];

/// Directives that change what is served or who may be served; tidegate has no equivalent.
const UNSUPPORTED: &[(&str, &str)] = &[
    ("return", "answers requests itself (tidegate only proxies)"),
    ("rewrite", "rewrites URIs (tidegate forwards the path unchanged)"),
    ("try_files", "serves files or switches locations (tidegate only proxies)"),
    ("auth_basic", "access control: tidegate would serve requests nginx refused"),
    ("auth_basic_user_file", "access control: tidegate would serve requests nginx refused"),
    ("auth_request", "access control: tidegate would serve requests nginx refused"),
    ("auth_jwt", "access control: tidegate would serve requests nginx refused"),
    ("allow", "access control: tidegate would serve requests nginx refused"),
    ("deny", "access control: tidegate would serve requests nginx refused"),
    ("satisfy", "access control: tidegate would serve requests nginx refused"),
    ("internal", "makes a location reachable only internally"),
    ("ssl_verify_client", "client certificate authentication: tidegate would serve clients nginx refused"),
    ("ssl_client_certificate", "client certificate authentication: tidegate would serve clients nginx refused"),
    ("proxy_ssl_certificate", "client certificates towards the servers are not supported"),
    ("proxy_ssl_certificate_key", "client certificates towards the servers are not supported"),
    ("fastcgi_pass", "FastCGI backends are not supported (tidegate proxies HTTP)"),
    ("uwsgi_pass", "uwsgi backends are not supported (tidegate proxies HTTP)"),
    ("scgi_pass", "SCGI backends are not supported (tidegate proxies HTTP)"),
    ("grpc_pass", "gRPC proxying (HTTP/2) is not supported"),
    ("memcached_pass", "memcached backends are not supported"),
    ("stub_status", "answers status requests itself"),
    ("empty_gif", "answers requests itself"),
    ("mirror", "request mirroring is not supported"),
    ("js_content", "njs content handlers are not supported"),
    ("perl", "perl content handlers are not supported"),
    ("secure_link", "secure links are not supported"),
    ("limit_except", "method-based access control: tidegate would serve requests nginx refused"),
    ("ssl_reject_handshake", "refuses TLS handshakes for unknown names; tidegate serves its default certificate instead"),
];

/// Proxy settings without an equivalent that do not change where a request goes.
const WARN: &[(&str, &str)] = &[
    ("proxy_buffers", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_busy_buffers_size", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_max_temp_file_size", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_temp_file_write_size", "tidegate streams bodies; buffering is not configurable"),
    ("proxy_redirect", "tidegate does not rewrite Location headers"),
    ("proxy_cookie_domain", "tidegate does not rewrite Set-Cookie headers"),
    ("proxy_cookie_path", "tidegate does not rewrite Set-Cookie headers"),
    ("proxy_cookie_flags", "tidegate does not rewrite Set-Cookie headers"),
    ("proxy_hide_header", "tidegate passes response headers unchanged (hop-by-hop ones removed)"),
    ("proxy_pass_header", "tidegate passes response headers unchanged (hop-by-hop ones removed)"),
    ("proxy_ignore_headers", "tidegate has no cache; nothing to ignore"),
    ("proxy_intercept_errors", "tidegate passes error responses through"),
    ("proxy_set_body", "tidegate forwards the request body unchanged"),
    ("proxy_pass_request_headers", "tidegate always forwards request headers"),
    ("proxy_pass_request_body", "tidegate always forwards the request body"),
    ("proxy_next_upstream_timeout", "tidegate bounds retries by tries and the connect timeout"),
    ("proxy_socket_keepalive", "not configurable"),
    ("proxy_bind", "tidegate connects from the system's default source address"),
    ("proxy_method", "tidegate forwards the client's method"),
    ("proxy_ignore_client_abort", "tidegate cancels the upstream request when the client goes away"),
    ("proxy_limit_rate", "no rate limiting"),
    ("proxy_store", "tidegate does not store responses"),
    ("proxy_store_access", "tidegate does not store responses"),
    ("proxy_force_ranges", "not configurable"),
    ("proxy_no_cache", "tidegate has no cache"),
    ("proxy_ssl_protocols", "tidegate uses rustls's safe defaults (TLS 1.2 and 1.3) towards servers"),
    ("proxy_ssl_ciphers", "tidegate uses rustls's safe defaults towards servers"),
    ("proxy_ssl_session_reuse", "not configurable"),
    ("proxy_ssl_verify_depth", "not configurable"),
    ("proxy_ssl_crl", "CRLs are not supported"),
    ("proxy_ssl_conf_command", "not configurable"),
    ("proxy_download_rate", "no rate limiting"),
    ("proxy_upload_rate", "no rate limiting"),
    ("proxy_responses", "tidegate proxies TCP only"),
    ("proxy_half_close", "not configurable"),
    ("error_page", "tidegate passes the servers' error responses through and answers its own errors (502, 503, 504) plainly"),
    ("add_header", "tidegate does not add response headers"),
    ("add_trailer", "tidegate does not add trailers"),
    ("more_set_headers", "tidegate does not add headers"),
    ("more_clear_headers", "tidegate does not remove headers"),
    ("more_set_input_headers", "tidegate does not add request headers"),
    ("client_max_body_size", "tidegate does not limit request bodies (they are streamed)"),
    ("client_body_timeout", "not configurable"),
    ("send_timeout", "not configurable"),
    ("expires", "tidegate does not add Expires/Cache-Control headers"),
    ("chunked_transfer_encoding", "not configurable"),
    ("limit_req", "no request rate limiting"),
    ("limit_conn", "no connection limiting per key (max_conns limits per server)"),
    ("limit_rate", "no rate limiting"),
    ("limit_rate_after", "no rate limiting"),
    ("sub_filter", "tidegate does not rewrite response bodies"),
    ("sub_filter_once", "tidegate does not rewrite response bodies"),
    ("sub_filter_types", "tidegate does not rewrite response bodies"),
    ("set", "variables do not exist in tidegate"),
    ("underscores_in_headers", "tidegate passes headers with underscores"),
    ("recursive_error_pages", "no error pages"),
    ("max_ranges", "not configurable"),
    ("ssl_ciphers", "tidegate uses rustls's cipher suites"),
    ("ssl_prefer_server_ciphers", "tidegate uses rustls's cipher suites"),
    ("ssl_session_timeout", "session resumption is on with rustls's defaults"),
    ("ssl_session_tickets", "session resumption is on with rustls's defaults"),
    ("ssl_session_ticket_key", "session tickets use keys rotated by tidegate"),
    ("ssl_dhparam", "rustls has no finite-field Diffie-Hellman"),
    ("ssl_ecdh_curve", "rustls chooses key-exchange groups"),
    ("ssl_buffer_size", "not configurable"),
    ("ssl_trusted_certificate", "OCSP stapling is not supported"),
    ("ssl_early_data", "0-RTT is off"),
    ("ssl_conf_command", "not configurable"),
    ("ssl_password_file", "encrypted keys are not supported: decrypt the key file"),
    ("ssl_handshake_timeout", "tidegate's handshake_timeout (default 10s) applies"),
    ("http2", "tidegate speaks HTTP/1.1 to clients (ALPN http/1.1); HTTP/2 clients fall back"),
    ("http2_push", "HTTP/2 is not supported"),
    ("http2_push_preload", "HTTP/2 is not supported"),
    ("http2_max_concurrent_streams", "HTTP/2 is not supported"),
    ("http2_max_field_size", "HTTP/2 is not supported"),
    ("http2_max_header_size", "HTTP/2 is not supported"),
    ("http2_recv_buffer_size", "HTTP/2 is not supported"),
    ("http2_body_preread_size", "HTTP/2 is not supported"),
    ("http2_idle_timeout", "HTTP/2 is not supported"),
    ("http3", "HTTP/3 is not supported"),
    ("proxy_protocol_timeout", "the PROXY header must arrive within the listener's header_read timeout"),
    ("ssi", "server-side includes are not supported"),
    ("sub_filter_last_modified", "tidegate does not rewrite response bodies"),
    ("proxy_cache", "tidegate has no cache"),
    ("proxy_cache_key", "tidegate has no cache"),
    ("proxy_cache_valid", "tidegate has no cache"),
    ("proxy_cache_bypass", "tidegate has no cache"),
    ("proxy_cache_use_stale", "tidegate has no cache"),
    ("proxy_cache_lock", "tidegate has no cache"),
    ("proxy_cache_methods", "tidegate has no cache"),
    ("proxy_cache_min_uses", "tidegate has no cache"),
    ("proxy_cache_revalidate", "tidegate has no cache"),
    ("proxy_cache_background_update", "tidegate has no cache"),
];

/// Directives that make a location serve content (or hand it to a non-HTTP backend).
const CONTENT: &[&str] = &[
    "return",
    "try_files",
    "root",
    "alias",
    "index",
    "autoindex",
    "stub_status",
    "empty_gif",
    "fastcgi_pass",
    "uwsgi_pass",
    "scgi_pass",
    "grpc_pass",
    "memcached_pass",
    "js_content",
    "perl",
];

fn is_irrelevant(name: &str) -> bool {
    IRRELEVANT.contains(&name) || IRRELEVANT_PREFIXES.iter().any(|p| name.starts_with(p))
}

// =======================================================================================
// Converter: walking the tree
// =======================================================================================

impl Cx {
    fn new(prefix: PathBuf, main_file: PathBuf) -> Self {
        Cx {
            prefix,
            main_file,
            notes: Vec::new(),
            seen_notes: BTreeSet::new(),
            skipped: Vec::new(),
            shutdown_timeout: None,
            ups: Vec::new(),
            http_names: BTreeMap::new(),
            stream_names: BTreeMap::new(),
            addr_ups: BTreeMap::new(),
            taken: BTreeSet::new(),
            maps: Vec::new(),
            servers: Vec::new(),
            listeners: Vec::new(),
        }
    }

    /// `path` as shown in notes and comments: relative to the main file's directory.
    fn shown(&self, path: &Path) -> PathBuf {
        match path.strip_prefix(&self.prefix) {
            Ok(rel) if !rel.as_os_str().is_empty() => rel.to_path_buf(),
            _ => path.to_path_buf(),
        }
    }

    fn at(&self, loc: &Loc) -> String {
        format!("{}:{}", self.shown(&loc.file).display(), loc.line)
    }

    fn note(&mut self, loc: &Loc, level: Level, message: impl Into<String>) {
        let message: String = message.into().replace(['\n', '\r'], " ");
        let file = self.shown(&loc.file);
        if self.seen_notes.insert((file.clone(), loc.line, level, message.clone())) {
            self.notes.push(Note { file, line: loc.line, level, message });
        }
    }

    fn converted(&mut self, d: &Directive, message: impl Into<String>) {
        self.note(&d.loc(), Level::Converted, message);
    }

    fn warn(&mut self, d: &Directive, message: impl Into<String>) {
        self.note(&d.loc(), Level::Warning, message);
    }

    fn unsupported(&mut self, d: &Directive, message: impl Into<String>) {
        self.note(&d.loc(), Level::Unsupported, message);
    }

    fn skip(&mut self, d: &Directive) {
        self.skipped.push(Skipped { file: self.shown(&d.file), line: d.line, directive: d.name.clone() });
    }

    /// A directive no walker handles: skipped, warned about or unsupported by its class.
    fn other(&mut self, d: &Directive, ctx: Ctx) {
        let n = d.name.as_str();
        if ctx == (Ctx::Location { proxies: false }) && (CONTENT.contains(&n) || n.contains("_by_lua")) {
            return; // covered by the location's own note
        }
        if is_irrelevant(n) {
            self.skip(d);
        } else if n.contains("_by_lua") || n.starts_with("lua_") {
            if n.starts_with("lua_") || n.starts_with("init") || n.starts_with("log_by") || n.starts_with("header_filter") {
                self.warn(d, format!("{}: Lua is not supported; not carried over", d.text()));
            } else {
                self.unsupported(d, format!("{}: Lua handlers are not supported; they may change routing or answer requests", d.text()));
            }
        } else if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| *k == n) {
            self.unsupported(d, format!("{}: not converted: {why}", d.text()));
        } else if let Some((_, why)) = WARN.iter().find(|(k, _)| *k == n) {
            self.warn(d, format!("{}: not carried over: {why}", d.text()));
        } else if n.starts_with("proxy_cache") || n.starts_with("fastcgi_") || n.starts_with("uwsgi_") || n.starts_with("scgi_") {
            self.warn(d, format!("{}: not carried over: tidegate has no cache and proxies HTTP only", d.text()));
        } else if n.starts_with("ssl_") || n.starts_with("proxy_ssl_") {
            self.warn(d, format!("{}: not carried over: TLS tuning uses rustls's defaults", d.text()));
        } else if n.starts_with("proxy_") {
            self.warn(d, format!("{}: not carried over: no equivalent setting", d.text()));
        } else if ctx == Ctx::Upstream {
            self.unsupported(d, format!("{}: unknown directive in an upstream block (a third-party balancer?); not converted", d.text()));
        } else {
            self.warn(d, format!("{}: unknown directive (a third-party module?); not carried over", d.text()));
        }
    }

    fn main(&mut self, tree: &[Directive]) {
        for d in tree {
            match d.name.as_str() {
                "http" if d.block.is_some() => self.http(d),
                "stream" if d.block.is_some() => self.stream(d),
                "events" => self.skip(d),
                "mail" => self.warn(d, "mail proxying is not supported; the mail block is skipped"),
                "worker_shutdown_timeout" => match d.arg(0).and_then(nginx_time_ms).filter(|&ms| ms > 0) {
                    Some(ms) => {
                        self.shutdown_timeout = Some((ms, d.loc()));
                        self.converted(d, "-> shutdown_timeout");
                    }
                    None => self.warn(d, format!("{}: cannot read the time; not carried over", d.text())),
                },
                _ => self.other(d, Ctx::Main),
            }
        }
        self.build_http_listeners();
    }

    fn http(&mut self, d: &Directive) {
        let block = d.children();
        let scope = self.scope(block, &Scope::default(), Ctx::Http);
        for c in block {
            match c.name.as_str() {
                "map" => self.map(c, false),
                "upstream" => self.upstream(c, false),
                _ => {}
            }
        }
        for c in block.iter().filter(|c| c.name == "server") {
            self.http_server(c, &scope);
        }
    }

    fn stream(&mut self, d: &Directive) {
        let block = d.children();
        let scope = self.scope(block, &Scope::default(), Ctx::Stream);
        for c in block {
            match c.name.as_str() {
                "map" => self.map(c, true),
                "upstream" => self.upstream(c, true),
                _ => {}
            }
        }
        for c in block.iter().filter(|c| c.name == "server") {
            self.stream_server(c, &scope);
        }
    }

    /// Reads a block's settings on top of the inherited `parent`, and classifies every
    /// directive no walker handles.
    fn scope(&mut self, block: &[Directive], parent: &Scope, ctx: Ctx) -> Scope {
        let mut s = parent.clone();
        let (mut headers, mut certs, mut keys, mut real_ip) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let stream = matches!(ctx, Ctx::Stream | Ctx::StreamServer);
        for d in block {
            let n = d.name.as_str();
            let time = |d: &Directive| d.arg(0).and_then(nginx_time_ms).map(|ms| (ms, d.loc()));
            match n {
                // Handled by the walkers.
                "upstream" | "server" | "map" | "location" | "if" | "listen" | "server_name" | "proxy_pass" | "include" => {}
                "http" | "stream" | "events" | "mail" if ctx == Ctx::Main => {}
                "proxy_connect_timeout" | "proxy_read_timeout" | "proxy_send_timeout" | "proxy_timeout"
                | "keepalive_timeout" | "client_header_timeout" => {
                    let Some(v) = time(d) else {
                        self.warn(d, format!("{}: cannot read the time; not carried over", d.text()));
                        continue;
                    };
                    match n {
                        "proxy_connect_timeout" => s.connect = Some(v),
                        "proxy_read_timeout" => s.read = Some(v),
                        "proxy_send_timeout" => s.send = Some(v),
                        "proxy_timeout" => s.stream_timeout = Some(v),
                        "keepalive_timeout" => s.keepalive_timeout = Some(v),
                        _ => s.header_timeout = Some(v),
                    }
                }
                "proxy_next_upstream_tries" => match d.arg(0).and_then(|a| a.parse::<u64>().ok()) {
                    Some(t) => s.tries = Some((t, d.loc())),
                    None => self.warn(d, format!("{}: not a number; not carried over", d.text())),
                },
                "proxy_next_upstream" => {
                    s.next_upstream = Some((d.args.iter().map(|a| a.value.clone()).collect(), d.loc()));
                }
                "proxy_set_header" => match (d.arg(0), d.arg(1)) {
                    (Some(name), Some(value)) if d.args.len() == 2 => {
                        headers.push(Header { name: name.to_ascii_lowercase(), value: value.to_string(), loc: d.loc() })
                    }
                    _ => self.warn(d, format!("{}: expected a header name and a value; not carried over", d.text())),
                },
                "proxy_http_version" => {
                    self.converted(d, "tidegate always speaks HTTP/1.1 to servers (keep-alive, WebSocket upgrades); nothing to emit")
                }
                "proxy_buffering" | "proxy_request_buffering" => {
                    self.converted(d, "tidegate always streams request and response bodies; nothing to emit")
                }
                "ssl_certificate" | "ssl_certificate_key" => match d.arg(0) {
                    Some(p) if d.args.len() == 1 => {
                        if n == "ssl_certificate" {
                            certs.push((p.to_string(), d.loc()));
                        } else {
                            keys.push((p.to_string(), d.loc()));
                        }
                    }
                    _ => self.warn(d, format!("{}: expected one path", d.text())),
                },
                "ssl_protocols" => s.protocols = Some((d.args.iter().map(|a| a.value.clone()).collect(), d.loc())),
                "ssl" => s.ssl_on = d.arg(0) == Some("on"),
                "set_real_ip_from" => match d.arg(0) {
                    Some(v) => real_ip.push((v.to_string(), d.loc())),
                    None => self.warn(d, "set_real_ip_from without an address"),
                },
                "real_ip_header" => {
                    if let Some(v) = d.arg(0) {
                        s.real_ip_header = Some((v.to_string(), d.loc()));
                    }
                }
                "proxy_ssl_verify" => s.ssl_verify = Some((d.arg(0) == Some("on"), d.loc())),
                "proxy_ssl_trusted_certificate" => {
                    if let Some(v) = d.arg(0) {
                        s.ssl_trusted = Some((v.to_string(), d.loc()));
                    }
                }
                "proxy_ssl_name" => {
                    if let Some(v) = d.arg(0) {
                        s.ssl_name = Some((v.to_string(), d.loc()));
                    }
                }
                "proxy_ssl_server_name" => s.ssl_server_name = d.arg(0) == Some("on"),
                "proxy_protocol" if stream => {
                    if d.arg(0) == Some("on") {
                        s.send_proxy = Some(d.loc());
                        self.converted(d, "-> send_proxy = \"v1\" on the upstream (nginx sends PROXY protocol v1)");
                    } else {
                        s.send_proxy = None;
                    }
                }
                "ssl_preread" if stream => s.ssl_preread = d.arg(0) == Some("on"),
                "proxy_ssl" if stream => {
                    s.proxy_ssl = if d.arg(0) == Some("on") { Some(d.loc()) } else { None };
                }
                "keepalive" if ctx == Ctx::Upstream => {}
                _ if d.block.is_some() && !matches!(n, "limit_except" | "types" | "geo" | "split_clients" | "events") => {
                    self.other(d, ctx)
                }
                _ => self.other(d, ctx),
            }
        }
        if !headers.is_empty() {
            s.headers = headers;
        }
        if !certs.is_empty() || !keys.is_empty() {
            s.certs = certs;
            s.keys = keys;
        }
        if !real_ip.is_empty() {
            s.real_ip_from = real_ip;
        }
        s
    }

    /// `map $source $target { ... }`: kept for `proxy_pass $target` (stream SNI routing) and
    /// for recognising the WebSocket `$connection_upgrade` idiom.
    fn map(&mut self, d: &Directive, stream: bool) {
        let (Some(source), Some(target)) = (d.arg(0).and_then(single_var), d.arg(1).and_then(single_var)) else {
            self.skip(d);
            return;
        };
        let mut m =
            MapDef { source, target, hostnames: false, default: None, entries: Vec::new(), loc: d.loc(), stream };
        for e in d.children() {
            match (e.name.as_str(), e.arg(0)) {
                ("hostnames", None) => m.hostnames = true,
                ("volatile", None) => {}
                ("default", Some(v)) => m.default = Some((v.to_string(), e.loc())),
                (key, Some(v)) => m.entries.push((key.to_string(), v.to_string(), e.loc())),
                _ => {}
            }
        }
        self.maps.push(m);
    }

    fn map_for(&self, var: &str, stream: bool) -> Option<&MapDef> {
        self.maps.iter().rev().find(|m| m.target == var && m.stream == stream)
    }

    /// A tidegate upstream name for nginx name `want`: unique, valid characters.
    fn claim_name(&mut self, want: &str) -> String {
        let mut base: String =
            want.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') { c } else { '_' }).collect();
        if base.is_empty() {
            base = "upstream".into();
        }
        let mut name = base.clone();
        let mut n = 2;
        while self.taken.contains(&name) {
            name = format!("{base}-{n}");
            n += 1;
        }
        self.taken.insert(name.clone());
        name
    }

    fn new_up(&mut self, name: String, label: String, loc: Loc, stream: bool) -> usize {
        self.ups.push(Up {
            name,
            label,
            loc,
            stream,
            method: Method::RoundRobin,
            method_loc: None,
            sticky: None,
            keepalive: None,
            servers: Vec::new(),
            health: None,
            dead: None,
            uses: Vec::new(),
            tls: None,
            host_warned: false,
        });
        self.ups.len() - 1
    }
}
