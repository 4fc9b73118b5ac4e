//! The per-dialect parts of the shared store body ([`crate::body`]): one module per backend,
//! with the same names in each — the statements whose SQL differs (row locks, the store's
//! clock), how a timestamp and a JSON value are bound ([`postgres::ts`] / [`sqlite::ts`],
//! `json`) and read back (their [`crate::rows::DbRow`] implementations), and how a list
//! parameter is written (`= ANY($n)` against `IN (…)`). Statements that read the same in both
//! dialects (numbered `$n` parameters work on SQLite too) stay in the body.

pub(crate) mod postgres;
pub(crate) mod sqlite;
