"""`python -m data_prep`: thin CLI over pipeline.data.prep."""
