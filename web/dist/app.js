// Placeholder until the dashboard bundle is built: shows that the external script runs.
document.getElementById("status").textContent = "The dashboard bundle is not built yet.";
