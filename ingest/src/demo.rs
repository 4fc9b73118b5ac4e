//! Demo data for the embedded default: users, subjects, devices, zones and curfews.
