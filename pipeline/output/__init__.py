"""What a job leaves under its output prefix: committing parts (writer), statistics, verifying
an output against its manifest, and the HTML report."""
