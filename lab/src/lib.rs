//! Lab support.
