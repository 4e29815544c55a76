pub mod controller;
pub mod kmock;
