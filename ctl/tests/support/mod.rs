pub mod kmock;
