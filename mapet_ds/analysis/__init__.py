"""Looking at runs: the fair comparison runner and its report, pictures, k-NN evaluation."""
