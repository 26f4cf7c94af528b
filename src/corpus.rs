//! The synthetic data set generator behind `refrag make_corpus`.
