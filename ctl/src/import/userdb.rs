//! chasquid's users files (`domains/<domain>/users`, a `userdb.ProtoDB` in
//! protobuf text) to tambo's (`user <PHC hash>` or `user !` per line), so
//! nobody has to reset a password.
//!
//! A chasquid scrypt entry holds logN, r, p, the key length, the raw salt
//! bytes and the derived key. scrypt's PHC hasher feeds the KDF the salt
//! string's B64 *decoding* (scrypt 0.11 `simple.rs`: `salt.decode_b64`),
//! so writing chasquid's raw salt bytes as unpadded standard B64 makes
//! tambo derive exactly what chasquid derived. The PHC salt holds 4 to 64
//! B64 characters, i.e. 3 to 48 bytes: chasquid's are 16.

use std::collections::BTreeMap;
use std::path::Path;

use base64::Engine;
use base64::engine::general_purpose::STANDARD_NO_PAD as B64;
use tambo_common::address;
use tambo_common::users::UserDb;

use super::prototext::{self, Field, single};

/// A converted users file.
#[derive(Debug)]
pub struct Users {
    /// The new file's text.
    pub text: String,
    pub total: usize,
    pub receive_only: usize,
    /// One line per user whose password could not be carried over.
    pub notes: Vec<String>,
}

/// What one chasquid entry becomes.
enum Credential {
    Hash(String),
    ReceiveOnly,
    /// Receive-only, because the password could not be carried over.
    Lost(String),
}

/// Converts the users file `data` (read from `path`) of `domain`. Errors
/// are the file's own (it does not parse as chasquid's format); a user
/// that cannot be carried over becomes receive-only, with a note.
pub fn convert(data: &[u8], path: &Path, domain: &str) -> Result<Users, String> {
    let at = |e: prototext::Error| e.at(path);
    let fields = prototext::parse(data).map_err(at)?;
    let mut users: BTreeMap<String, Credential> = BTreeMap::new();
    let mut notes = Vec::new();
    for f in &fields {
        if f.name != "users" {
            return Err(at(f.error("unknown field of a chasquid users file")));
        }
        let entry = f.message().map_err(at)?;
        for g in entry {
            if g.name != "key" && g.name != "value" {
                return Err(at(g.error("unknown field of a users entry")));
            }
        }
        let name = match single(entry, "key").map_err(at)? {
            Some(k) => k.string().map_err(at)?,
            None => String::new(),
        };
        let user = match address::normalize_user(&name) {
            Ok(u) => u,
            Err(e) => {
                notes.push(format!("not carried over: user {name:?} of {domain} ({e})"));
                continue;
            }
        };
        let credential = match single(entry, "value").map_err(at)? {
            Some(v) => credential(v.message().map_err(at)?).map_err(at)?,
            // No password at all: chasquid never authenticated it either.
            None => Credential::ReceiveOnly,
        };
        if let Credential::Lost(why) = &credential {
            notes.push(format!(
                "not carried over: the password of {user}@{domain} ({why}): receive-only until `tambo user-add {user}@{domain}`"
            ));
        }
        users.insert(user, credential);
    }
    let mut text = format!(
        "# Converted from chasquid's {} by `tambo import-chasquid`.\n",
        path.display()
    );
    let mut receive_only = 0;
    for (user, c) in &users {
        match c {
            Credential::Hash(h) => text.push_str(&format!("{user} {h}\n")),
            Credential::ReceiveOnly | Credential::Lost(_) => {
                receive_only += 1;
                text.push_str(&format!("{user} !\n"));
            }
        }
    }
    // Each line was checked alone; the whole file must load as well.
    UserDb::parse(&text, path).map_err(|e| format!("converting it would give {e}"))?;
    Ok(Users {
        text,
        total: users.len(),
        receive_only,
        notes,
    })
}

/// The `Password` message of one user (a oneof: scrypt, plain, denied).
fn credential(fields: &[Field]) -> Result<Credential, prototext::Error> {
    let mut scheme: Option<&Field> = None;
    for f in fields {
        if !matches!(f.name.as_str(), "scrypt" | "plain" | "denied") {
            return Err(f.error("unknown password scheme"));
        }
        if scheme.is_some() {
            return Err(f.error("a second password scheme for one user"));
        }
        scheme = Some(f);
    }
    let Some(f) = scheme else {
        return Ok(Credential::ReceiveOnly);
    };
    let inner = f.message()?;
    Ok(match f.name.as_str() {
        "scrypt" => match phc(&Scrypt::read(inner)?) {
            Ok(h) => Credential::Hash(h),
            Err(why) => Credential::Lost(why),
        },
        "plain" => Credential::Lost("chasquid's plain-text scheme, meant for tests".into()),
        _ => {
            if let Some(extra) = inner.first() {
                return Err(extra.error("unknown field of denied"));
            }
            Credential::ReceiveOnly
        }
    })
}

/// chasquid's `userdb.Scrypt`.
#[derive(Debug, Default, PartialEq)]
struct Scrypt {
    log_n: u64,
    r: i32,
    p: i32,
    key_len: i32,
    salt: Vec<u8>,
    encrypted: Vec<u8>,
}

impl Scrypt {
    fn read(fields: &[Field]) -> Result<Self, prototext::Error> {
        let mut s = Scrypt::default();
        for f in fields {
            if fields.iter().filter(|g| g.name == f.name).count() > 1 {
                return Err(f.error("given twice"));
            }
            match f.name.as_str() {
                "logN" => s.log_n = f.int_as()?,
                "r" => s.r = f.int_as()?,
                "p" => s.p = f.int_as()?,
                "keyLen" => s.key_len = f.int_as()?,
                "salt" => s.salt = f.bytes()?.to_vec(),
                "encrypted" => s.encrypted = f.bytes()?.to_vec(),
                _ => return Err(f.error("unknown field of scrypt")),
            }
        }
        Ok(s)
    }
}

/// The PHC string tambo verifies exactly as chasquid verified `s`, or why
/// there is none.
fn phc(s: &Scrypt) -> Result<String, String> {
    if s.key_len != 32 {
        return Err(format!(
            "its scrypt key length is {}, and tambo's hashes are 32 bytes",
            s.key_len
        ));
    }
    if s.encrypted.len() != 32 {
        return Err(format!(
            "its hash is {} bytes, not the 32 its key length says",
            s.encrypted.len()
        ));
    }
    if !(3..=48).contains(&s.salt.len()) {
        return Err(format!(
            "its salt is {} bytes; a PHC hash holds 3 to 48",
            s.salt.len()
        ));
    }
    let ln = u8::try_from(s.log_n).map_err(|_| format!("its scrypt logN {} is absurd", s.log_n))?;
    let hash = format!(
        "$scrypt$ln={ln},r={},p={}${}${}",
        s.r,
        s.p,
        B64.encode(&s.salt),
        B64.encode(&s.encrypted)
    );
    // What tambo will refuse (cost bounds, parameters scrypt rejects) is
    // refused here, with tambo's reason, rather than when queued starts.
    let parsed =
        password_hash::PasswordHash::new(&hash).map_err(|e| format!("no PHC string: {e}"))?;
    tambo_common::users::check_cost(&parsed)?;
    scrypt::Params::try_from(&parsed).map_err(|e| {
        format!(
            "scrypt refuses its parameters ln={ln}, r={}, p={}: {e}",
            s.r, s.p
        )
    })?;
    Ok(hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Written by Debian's chasquid-util 1.11 (`user-add ann@x.org
    /// --password=secret`): a salt with a `\u` escape (two bytes), a hash
    /// with raw UTF-8 and `\n`.
    const CHASQUID_U: &str = r#"users: {
  key: "ann"
  value: {
    scrypt: {
      logN: 14
      r: 8
      p: 1
      keyLen: 32
      salt: "FY\x8e\x13\xa8\x83\xff`\x18\xb1\u008eSR\x00\xf8"
      encrypted: "}߫\x94\xab\xc76!\xa6\xa3\x0eC\x02\xd3\xc2\xe3\x839\xfd\x19-\xf6\x9cn\xa0\xe8\x96|\n\xb8\xd6\xe3"
    }
  }
}
"#;

    /// The same, with raw UTF-8 in the salt.
    const CHASQUID_RAW: &str = r#"users: {
  key: "ann"
  value: {
    scrypt: {
      logN: 14
      r: 8
      p: 1
      keyLen: 32
      salt: "\xae5\x19˧q͡&Fk\x8e\xee\xb1\x0e3"
      encrypted: "\x19\xb5\x16\xc3iPu+J>\xca+\x88KZg\xed\xa2\xd7]\xfe\xe4:\xbc\x0e\xff\x930\x823@u"
    }
  }
}
"#;

    fn hash_of(text: &str) -> String {
        let u = convert(text.as_bytes(), Path::new("d/users"), "x.org").unwrap();
        assert!(u.notes.is_empty(), "{:?}", u.notes);
        let line = u.text.lines().find(|l| l.starts_with("ann ")).unwrap();
        line["ann ".len()..].to_string()
    }

    #[test]
    fn chasquid_util_hashes_verify_in_tambo() {
        for text in [CHASQUID_U, CHASQUID_RAW] {
            let h = hash_of(text);
            assert!(h.starts_with("$scrypt$ln=14,r=8,p=1$"), "{h}");
            assert_eq!(tambo_common::password::verify(&h, b"secret"), Ok(true));
            assert_eq!(tambo_common::password::verify(&h, b"Secret"), Ok(false));
        }
    }

    #[test]
    fn the_salt_is_chasquids_bytes() {
        // Made here as chasquid makes them (scrypt.Key over the raw salt),
        // at a cheap cost; the salt has every byte class the escapes have.
        let salt = b"\x00\xc2\x8e\xff\"\\\n'";
        let mut key = [0u8; 32];
        scrypt::scrypt(
            b"pw",
            salt,
            &scrypt::Params::new(4, 8, 1, 32).unwrap(),
            &mut key,
        )
        .unwrap();
        let s = Scrypt {
            log_n: 4,
            r: 8,
            p: 1,
            key_len: 32,
            salt: salt.to_vec(),
            encrypted: key.to_vec(),
        };
        let h = phc(&s).unwrap();
        assert_eq!(tambo_common::password::verify(&h, b"pw"), Ok(true));
    }

    #[test]
    fn denied_plain_and_odd_entries() {
        let text = format!(
            "{CHASQUID_U}users: {{ key: \"bob\" value: {{ denied: {{}} }} }}\n\
             users: {{ key: \"carol\" value: {{ plain: {{ password: \"x\" }} }} }}\n\
             users: {{ key: \"dave\" value: {{ scrypt: {{ logN: 14 r: 8 p: 1 keyLen: 16 salt: \"0123456789abcdef\" encrypted: \"0123456789abcdef\" }} }} }}\n\
             users: {{ key: \"erin\" value: {{ scrypt: {{ logN: 40 r: 8 p: 1 keyLen: 32 salt: \"0123456789abcdef\" encrypted: \"0123456789abcdef0123456789abcdef\" }} }} }}\n\
             users: {{ key: \"fred\" value: {{ scrypt: {{ logN: 14 r: 8 p: 1 keyLen: 32 salt: \"ab\" encrypted: \"0123456789abcdef0123456789abcdef\" }} }} }}\n\
             users: {{ key: \"a b\" value: {{ denied: {{}} }} }}\n\
             users: {{ key: \"Gus\" }}\n"
        );
        let u = convert(text.as_bytes(), Path::new("d/users"), "x.org").unwrap();
        assert_eq!((u.total, u.receive_only), (7, 6));
        let lines: Vec<&str> = u.text.lines().skip(1).collect();
        assert!(lines[0].starts_with("ann $scrypt$"), "{lines:?}");
        assert_eq!(
            lines[1..],
            ["bob !", "carol !", "dave !", "erin !", "fred !", "gus !"]
        );
        let notes = u.notes.join("\n");
        for needle in [
            "user \"a b\" of x.org",
            "password of carol@x.org (chasquid's plain-text scheme",
            "dave@x.org (its scrypt key length is 16",
            "erin@x.org (scrypt parameters ln=40",
            "fred@x.org (its salt is 2 bytes",
            "receive-only until `tambo user-add fred@x.org`",
        ] {
            assert!(notes.contains(needle), "{needle}: {notes}");
        }
        assert_eq!(u.notes.len(), 5);
    }

    #[test]
    fn a_file_chasquid_would_refuse_is_an_error_naming_the_line() {
        for (text, needle) in [
            ("users: {\n key: \"ann\"\n", "d/users:2: expected"),
            ("user: { key: \"ann\" }", "d/users:1: user: unknown field"),
            ("users: { key: \"ann\" vale: {} }", "vale: unknown field"),
            ("users: { key: 1 }", "key: expected a quoted string"),
            (
                "users: { key: \"a\" value: { denied: {} plain: {} } }",
                "plain: a second password scheme",
            ),
            (
                "users: { key: \"a\" value: { md5: {} } }",
                "md5: unknown password scheme",
            ),
            (
                "users: { key: \"a\" value: { scrypt: { logN: -1 } } }",
                "logN: -1 is out of range",
            ),
            (
                "users: { key: \"a\" value: { scrypt: { r: 8 r: 8 } } }",
                "r: given twice",
            ),
            (
                "users: { key: \"a\" key: \"b\" }",
                "d/users:1: key: given twice",
            ),
        ] {
            let e = convert(text.as_bytes(), Path::new("d/users"), "x.org").unwrap_err();
            assert!(e.contains(needle), "{text:?}: {e}");
        }
    }
}
