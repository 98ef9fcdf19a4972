//! `--module`: which protocol module (engine::session::SessionModule) each worker's session
//! table gets. One instance per worker, made from the same spec.

use super::transform::FlagError;
use engine::session::{LineAuth, SessionModule};

const MODULE_FORM: &str =
    "line-auth[=VERB[:DEFAULT LINE]], e.g. --module 'line-auth=AUTH :AUTH secret' \
(learn each client's first line starting with VERB, default 'AUTH '; send it, or DEFAULT LINE, in \
front of sessions captured mid-stream)";

/// A parsed `--module` value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ModuleSpec {
    /// [`LineAuth`] with its argument (`verb[:default line]`).
    LineAuth(String),
}

impl ModuleSpec {
    /// Parses `NAME[=ARG]`.
    ///
    /// # Errors
    /// A [`FlagError`] naming `--module` for an unknown module or a bad argument.
    pub fn parse(text: &str) -> Result<ModuleSpec, FlagError> {
        let (name, arg) = match text.split_once('=') {
            Some((name, arg)) => (name.trim(), Some(arg)),
            None => (text.trim(), None),
        };
        match name {
            "line-auth" => {
                let arg = arg.unwrap_or("AUTH ");
                if arg.split(':').next().is_none_or(str::is_empty) {
                    return Err(FlagError {
                        flag: "--module",
                        value: text.to_string(),
                        reason: "line-auth needs a verb to learn".into(),
                        form: MODULE_FORM,
                    });
                }
                Ok(ModuleSpec::LineAuth(arg.to_string()))
            }
            other => Err(FlagError {
                flag: "--module",
                value: text.to_string(),
                reason: format!("no module named '{other}' (modules: line-auth)"),
                form: MODULE_FORM,
            }),
        }
    }

    /// A new instance (one per worker).
    pub fn build(&self) -> Box<dyn SessionModule> {
        match self {
            ModuleSpec::LineAuth(arg) => Box::new(LineAuth::from_arg(arg)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn specs_parse_and_bad_ones_name_the_flag() {
        assert_eq!(
            ModuleSpec::parse("line-auth").unwrap(),
            ModuleSpec::LineAuth("AUTH ".into())
        );
        let spec = ModuleSpec::parse("line-auth=AUTH :AUTH x").unwrap();
        assert_eq!(spec.build().name(), "line-auth");
        let e = ModuleSpec::parse("mysql").unwrap_err();
        assert_eq!(e.flag, "--module");
        assert!(e.to_string().contains("line-auth"), "{e}");
        assert!(ModuleSpec::parse("line-auth=:x").is_err());
    }
}
